"""The project's own error types: every bad input raises one of these with a message naming the
file, the group or key, and what is wrong."""


class EKDError(Exception):
    """Base class of every error ekd-lightning raises on purpose."""


class DataError(EKDError, ValueError):
    """A dataset or label file is missing, unreadable, or holds inconsistent content."""


class CheckpointError(EKDError, ValueError):
    """A checkpoint cannot be used: unreadable, from another model, or missing metadata."""


class LabelMismatchError(DataError):
    """A label file was made for another dataset or another teacher ensemble."""


class ConfigError(EKDError, ValueError):
    """A config asks for something impossible, or for a run folder that holds another run."""


class NonFiniteLossError(EKDError, RuntimeError):
    """Training produced a NaN/inf loss; training stopped before the weights were updated."""
