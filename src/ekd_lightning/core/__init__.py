"""Bottom layer: errors, units, checked ``_target_`` instantiation, old module paths.

Imports nothing else of ekd_lightning.
"""
