"""Training runs (``ekd-train`` of one stage): the run store, loggers and callbacks.

Below: core, data, models, task, inference, dynamics, distill.
"""
