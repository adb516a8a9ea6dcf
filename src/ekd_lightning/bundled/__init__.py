"""Bundled real dataset: small molecules labelled with GFN2-xTB (tblite), built by
:mod:`ekd_lightning.bundled.build` (``python -m ekd_lightning.bundled.build --out-dir DIR``).

* :data:`TRAIN_FILE` (``xtb_train.h5``, ANI-1x release layout): one group per formula for
  H/C/N/O neutral closed-shell molecules with <= 6 heavy atoms (one molecule per formula).
  Conformations: Langevin MD on the xTB surface at 300 K and 800 K plus harmonic normal-mode
  samples at 200-1000 K, around the xTB-optimised RDKit/MMFF geometry. Datasets:
  ``atomic_numbers`` (n_atoms,) int64, ``coordinates`` (n_conf, n_atoms, 3) float64 Å,
  ``gfn2_xtb.energy`` (n_conf,) float64 Hartree (plays the role of ``ccsd(t)_cbs.energy``) and
  ``gfn2_xtb.forces`` (n_conf, n_atoms, 3) float64 Hartree/Å (true forces, for evaluation only).
* :data:`TEST_FILE` (``xtb_comp6.h5``, COMP6 v1 layout): out-of-sample ``subset/molNN`` groups
  (``xtb_nm_organics``, ``xtb_nm_drugs``, ``xtb_peptides``: normal-mode samples of larger
  molecules; ``xtb_pair_scans``: dimer distance scans as in S66x8; ``xtb_md_frames``: 300 K MD
  frames; named so that they cannot be mistaken for the COMP6 subsets) with ``species`` (n_atoms,)
  ``|S1``, ``coordinates`` float32 Å, ``energies`` float64 Hartree, ``forces`` float32 Hartree/Å.

Every molecule group carries a ``smiles`` attribute; file roots carry method, program, preset and
unit attributes. Sizes of the shipped default build are listed in the builder's report.
"""

from pathlib import Path

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
"""Directory of the shipped HDF5 files."""
TRAIN_FILE: Path = DATA_DIR / "xtb_train.h5"
"""Training set, ANI-1x release layout."""
TEST_FILE: Path = DATA_DIR / "xtb_comp6.h5"
"""Out-of-sample test set, COMP6 v1 layout."""
ENERGY_KEY: str = "gfn2_xtb.energy"
"""Energy dataset of :data:`TRAIN_FILE` (Hartree)."""
FORCE_KEY: str = "gfn2_xtb.forces"
"""Force dataset of :data:`TRAIN_FILE` (Hartree/Å)."""
