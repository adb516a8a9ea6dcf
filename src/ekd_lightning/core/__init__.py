"""Bottom layer: errors, units, checked ``_target_`` instantiation, atomic file writing, file
hashes, provenance (version, git revision, creation time) and the old module paths.

Imports nothing else of ekd_lightning.
"""
