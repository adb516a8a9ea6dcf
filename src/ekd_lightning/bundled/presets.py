"""What a build of the bundled dataset is made of: the molecule lists (SMILES) of the training
and out-of-sample files and the sampling sizes of each preset (``default``, ``tiny``,
``second``), with the seeds each sample draws from."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

MD_SUBSET = "xtb_md_frames"
"""Test subset of MD frames (the other test subsets are normal-mode samples)."""


def stable_seed(*parts: str) -> int:
    """A 63-bit seed from a SHA-256 hash of the parts (stable across runs, unlike hash())."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


TRAIN_SMILES: tuple[str, ...] = (
    # 1-2 heavy atoms
    "O", "N", "C", "CO", "CN", "CC", "C=C", "C#C", "C=O", "OC=O", "NC=O", "NC(N)=O",
    "CC#N", "CCO", "CC=O", "CC(=O)O", "CC(N)=O", "CCN", "NCCO", "OCCO", "NCCN", "O=CC=O",
    "N#CC#N",
    # 3-4 heavy atoms
    "OC(=O)C(=O)O", "NCC(=O)O", "CCC", "C1CC1", "CC(C)=O", "CCCO", "COC(C)=O", "CC(=O)NC",
    "CCC#N", "C=CC=O", "C=CC(=O)O", "CC(O)C(=O)O", "CC(N)C(=O)O", "c1cnc[nH]1", "CCCC",
    "CC(C)=C", "CC(C)(C)O",
    # 5-6 heavy atoms: rings, esters, aromatics
    "C1CCOC1", "O=C1CCCO1", "CCOC(C)=O", "C1CCNC1", "O=C1CCCN1", "c1ccoc1", "c1cc[nH]c1",
    "c1cnccn1", "CCCCC", "O=C1CCCC1", "C1CCOCC1", "C1CCNCC1", "c1ccncc1", "Cc1ccco1",
    "C1CCCCC1", "c1ccccc1",
)
"""Training molecules (H/C/N/O, neutral closed shell, <= 6 heavy atoms, distinct formulas)."""

TEST_SMILES: dict[str, tuple[str, ...]] = {
    "xtb_nm_organics": (
        "CC(C)CC(C)=O", "OCc1ccncc1", "CC(=O)OCC(C)C", "O=C1CCCCCC1", "N#Cc1ccccc1",
        "COc1ccccc1", "CC1(C)CC(=O)CC(=O)C1", "OC1CC2CCC1C2", "CN1CCN(C)CC1", "Cc1cc(C)on1",
        "NC(=O)c1ccco1", "CCOC(=O)C(C)=O",
    ),
    "xtb_nm_drugs": (
        "CC(=O)Nc1ccc(O)cc1",  # paracetamol
        "CC(=O)Oc1ccccc1C(=O)O",  # aspirin
        "Cn1cnc2c1c(=O)n(C)c(=O)n2C",  # caffeine
        "CN1CCC[C@H]1c1cccnc1",  # nicotine
        "CC(C)Cc1ccc(cc1)C(C)C(=O)O",  # ibuprofen
        "OC(=O)c1ccccc1O",  # salicylic acid
        "CCOc1ccc(NC(C)=O)cc1",  # phenacetin
        "NNC(=O)c1ccncc1",  # isoniazid
    ),
    "xtb_peptides": (
        "CC(=O)NCC(=O)NC",  # Ace-Gly-NMe
        "CC(=O)N[C@@H](C)C(=O)NC",  # Ace-Ala-NMe
        "NCC(=O)NCC(=O)NCC(=O)O",  # Gly-Gly-Gly
        "NCC(=O)N[C@@H](C)C(=O)NCC(=O)O",  # Gly-Ala-Gly
        "C[C@H](N)C(=O)N[C@@H](C)C(=O)N[C@@H](C)C(=O)O",  # Ala-Ala-Ala
    ),
    MD_SUBSET: (
        "CCCCCCO", "Oc1ccccc1", "Nc1ccccc1", "CC(=O)CC(C)=O", "CCOCCOC", "OC(=O)c1ccccc1",
    ),
}
"""Out-of-sample test molecules per subset: normal-mode sampled (``xtb_nm_organics``: 7-10
heavy atoms, ``xtb_nm_drugs``: drug molecules, ``xtb_peptides``: capped and short peptides) or
300 K MD frames (``xtb_md_frames``). The subsets are named after what they hold, not after the
COMP6 subsets they resemble, so no table of xTB errors can pass for COMP6 (wB97X) results."""

DIMER_SMILES: tuple[str, ...] = (
    "O.O", "O.CO", "O.CN", "CO.CO", "CC(=O)O.CC(=O)O", "CC(N)=O.CC(N)=O", "c1ccccc1.O",
    "c1ccccc1.c1ccccc1",
)
"""Non-covalent dimers of the ``xtb_pair_scans`` subset, each scanned along the contact distance
as in S66x8."""

S66_SCALES: tuple[float, ...] = (0.90, 0.95, 1.00, 1.05, 1.10, 1.25, 1.50, 2.00)
"""S66x8 multiples of the equilibrium closest intermolecular contact distance."""


@dataclass(frozen=True)
class Preset:
    """Everything that determines a build (molecule lists and sampling sizes).

    MD: Langevin, 0.5 fs, friction 0.02 1/fs; ``md_equil`` steps, then one frame every
    ``md_stride`` steps. Normal-mode (NM) sampling: temperature uniform in ``nm_temps`` (K).
    ``nm_scheme``: ``boltzmann`` (the builder's harmonic samples) or ``ani1`` (ANI-1's generator,
    :func:`~ekd_lightning.bundled.build.ani1_normal_mode_frames`) for the training NM frames.
    Stretched frames (``stretch_frames`` per training molecule, none by default): a training MD
    frame with one terminal bond (X-H, C=O) pulled out by U(``stretch``) Å. Hydrogen-shift
    frames (``shift_frames``, none by default): a training MD frame with one H moved onto the
    path of a 1,2-shift to a heavy neighbour of its atom, U(``shift_height``) Å off that bond.
    """

    name: str
    train_smiles: tuple[str, ...] = TRAIN_SMILES
    test_smiles: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(TEST_SMILES))
    dimer_smiles: tuple[str, ...] = DIMER_SMILES
    md_temps: tuple[float, ...] = (300.0, 800.0)
    md_frames: int = 35
    md_stride: int = 40
    md_equil: int = 200
    nm_frames: int = 30
    nm_temps: tuple[float, float] = (200.0, 1000.0)
    nm_scheme: str = "boltzmann"
    test_nm_frames: int = 10
    test_md_temp: float = 300.0
    test_md_frames: int = 10
    test_md_stride: int = 100
    dimer_starts: int = 4
    opt_steps: int = 300
    stretch_frames: int = 0
    stretch: tuple[float, float] = (0.1, 0.8)
    shift_frames: int = 0
    shift_height: tuple[float, float] = (0.7, 1.2)
    seed_salt: str = ""

    def seed(self, *parts: str) -> int:
        """The seed of ``parts`` (:func:`stable_seed`), salted with ``seed_salt`` if set (the
        unsalted presets keep the seeds, hence the arrays, of the shipped build)."""
        return stable_seed(self.seed_salt, *parts) if self.seed_salt else stable_seed(*parts)


SECOND_TRAIN_SMILES: tuple[str, ...] = (
    # 1-2 heavy atoms
    "NN", "OO", "C#N", "NO", "C=N", "NC#N", "N=C=O", "COC", "CNC", "COC=O", "C1CO1", "C1CN1",
    "C=C=O", "CON", "NC(=O)O", "CNC=O",
    # 3-4 heavy atoms
    "CC(C)O", "CN(C)C", "CC=C", "CC#C", "C=CC#N", "COCO", "CC(=O)C=O", "NCC#N", "CCC=O",
    "C1CNC1", "COC(N)=O", "CCOC=O", "CC(C)C", "C1CCC1", "C=CC=C", "NCC(N)=O", "O=C1CCN1",
    "c1cn[nH]c1", "c1ccon1",
    # 5-6 heavy atoms
    "C1CCCC1", "c1cncnc1", "C1COCCN1", "CC(C)(C)C", "CCCCO", "O=C1CCC(=O)N1", "CC(=O)C(C)=O",
    "CN(C)C=O", "C1CNCCN1", "OC(=O)CC(=O)O", "CCC(C)=O", "Cc1ccc[nH]1", "OCC(O)CO",
    # a few larger (7 heavy atoms)
    "Cc1ccccc1", "OC1CCCCC1", "Cc1ccncc1",
)
"""Training molecules of the ``second`` preset (H/C/N/O, neutral closed shell, distinct formulas,
no SMILES of the bundled lists); they include the ASE g2 molecules CH3OCH3, HCOOCH3, C2H6CHOH and
C2H6NH for the pipeline's MD step (``pipeline.md.molecules``)."""

SECOND_TEST_SMILES: dict[str, tuple[str, ...]] = {
    "xtb_nm_organics": (
        "CC(C)C(=O)OC", "Cc1ccc(O)cc1", "O=C1CCCCC1", "CCN(CC)CC", "NCc1ccccc1", "O=Cc1ccccc1",
        "CC1CCCCC1", "COC(=O)c1ccccc1",
    ),
    "xtb_nm_drugs": (
        "NC(=O)c1cccnc1",  # nicotinamide
        "CC(=O)Nc1ccccc1",  # acetanilide
        "Cn1c(=O)c2[nH]cnc2n(C)c1=O",  # theophylline
        "CCOC(=O)c1ccc(N)cc1",  # benzocaine
        "CN(C)C(=N)N=C(N)N",  # metformin
    ),
    "xtb_peptides": (
        "CC(=O)N[C@@H](C(C)C)C(=O)NC",  # Ace-Val-NMe
        "CC(=O)N[C@@H](CO)C(=O)NC",  # Ace-Ser-NMe
        "NCC(=O)N[C@@H](C)C(=O)O",  # Gly-Ala
        "C[C@H](N)C(=O)NCC(=O)O",  # Ala-Gly
    ),
    MD_SUBSET: ("CCOC(=O)CC", "CC(=O)c1ccccc1", "CCCCN", "OCCOCCO", "Cc1cccnc1"),
}
"""Out-of-sample test molecules of the ``second`` preset, per subset (as :data:`TEST_SMILES`)."""

SECOND_DIMER_SMILES: tuple[str, ...] = (
    "N.N", "N.O", "C=O.O", "COC.O", "NC=O.NC=O", "c1ccncc1.O", "CC#N.CC#N", "OC=O.OC=O",
)
"""Dimers of the ``second`` preset's ``xtb_pair_scans`` subset."""

PRESETS: dict[str, Preset] = {
    "default": Preset("default"),
    "tiny": Preset(
        "tiny",
        train_smiles=("O", "CO", "CC#N"),
        test_smiles={k: v[:1] for k, v in TEST_SMILES.items()},
        dimer_smiles=("O.O",),
        md_frames=3, md_stride=5, md_equil=10, nm_frames=3,
        test_nm_frames=3, test_md_frames=3, test_md_stride=10, dimer_starts=1, opt_steps=60,
    ),
    "second": Preset(
        "second", train_smiles=SECOND_TRAIN_SMILES, test_smiles=SECOND_TEST_SMILES,
        dimer_smiles=SECOND_DIMER_SMILES, seed_salt="second", md_frames=25,
    ),  # 80 conformations per molecule (not 100), to build in about half an hour on 2 cores
    "stretched": Preset("stretched", stretch_frames=20),
    "ani1_nms": Preset("ani1_nms", nm_scheme="ani1", nm_temps=(300.0, 300.0)),
    "second_stretched": Preset(
        "second_stretched", train_smiles=SECOND_TRAIN_SMILES, test_smiles=SECOND_TEST_SMILES,
        dimer_smiles=SECOND_DIMER_SMILES, seed_salt="second", md_frames=25, stretch_frames=16,
    ),
    "stretched_shift": Preset("stretched_shift", stretch_frames=20, shift_frames=20),
    "second_stretched_shift": Preset(
        "second_stretched_shift", train_smiles=SECOND_TRAIN_SMILES, test_smiles=SECOND_TEST_SMILES,
        dimer_smiles=SECOND_DIMER_SMILES, seed_salt="second", md_frames=25, stretch_frames=16,
        shift_frames=16,
    ),
}
"""``stretched`` and ``second_stretched``: ``default`` and ``second`` (the same arrays) plus 20% of
frames with a terminal bond pulled out 0.1-0.8 Å (issue 24's data lever: reference energies where
hot MD breaks the models). ``ani1_nms``: ``default`` with its training normal-mode frames drawn
as ANI-1 drew them (300 K), which stretches X-H bonds further (``benchmarks/nms_width.py``).
``stretched_shift`` and ``second_stretched_shift``: the stretched presets (the same arrays) plus as
many hydrogen-shift frames (issue 24: hydrogen transfers, the failures the stretched frames
left)."""
