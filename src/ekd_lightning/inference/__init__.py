"""Trained potentials in use: a checkpoint or an ensemble as members and their mean, teacher
ensembles, the ASE calculator, ``ekd-predict`` and ``ekd-export``.

Below: core, data, models, task.
"""
