"""Ensemble distillation: label a dataset with a teacher ensemble's forces (HDF5 label file).

- :func:`make_job` + :func:`distill_labels`: the one implementation, a Lightning predict loop
  with a writer callback (:class:`LabelShardWriter`), resumable, single process or DDP;
  ``distill.py`` (:func:`run_from_config`) and ``train.py`` (:func:`labels_for_training`, labels
  made before a student's first epoch) both use it.
- :class:`TeacherEnsemble`: same-architecture ANI teachers evaluated as one batched module.
- :func:`resolve_teachers`: checkpoints, folders of checkpoints, published torchani ensembles.

The label file format and its checks live in :mod:`ekd_lightning.data.labels`.
"""

from ..inference.teachers import TeacherSource, load_teachers, resolve_teachers
from .config import (
    job_from_config,
    labels_for_training,
    run_from_config,
    teachers_override_argv,
)
from .ensemble import StackedANI, TeacherEnsemble, TeacherLoop
from .run import (
    DistillInterrupted,
    DistillJob,
    LabelShardWriter,
    distill_labels,
    make_job,
    merge_shards,
)

__all__ = [
    "DistillInterrupted", "DistillJob", "LabelShardWriter", "StackedANI", "TeacherEnsemble",
    "TeacherLoop", "TeacherSource", "distill_labels", "job_from_config", "labels_for_training",
    "load_teachers", "make_job", "merge_shards", "resolve_teachers", "run_from_config",
    "teachers_override_argv",
]
