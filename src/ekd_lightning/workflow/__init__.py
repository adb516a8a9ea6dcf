"""Orchestration: composing runs from the Hydra configs, the EKD pipeline with its report and
ablations, the progress display.

Below: every other layer; above it only :mod:`ekd_lightning.cli`.
"""
