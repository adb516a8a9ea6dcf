"""Dynamics: many MD replicas of many molecules in one flat batch, and their Langevin BAOAB
integrator (ASE units).

Below: core, data, models, task, inference.
"""
