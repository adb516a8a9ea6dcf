"""Trained potentials in use: teacher ensembles and checkpoint members, the ASE calculator,
``ekd-predict`` and ``ekd-export``.

Below: core, data, models, task.
"""
