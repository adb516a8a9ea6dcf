"""The Lightning module (:class:`~ekd_lightning.task.module.PotentialModule`) and its checkpoints.

Below: core, data, models.
"""
