"""Judging models: COMP6-style evaluation (``ekd-evaluate``), MD stability (``ekd-md``, the batched
replicas), survival statistics and plots.

Below: core, data, models, task, inference, dynamics, distill, train.
"""
