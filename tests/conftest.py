"""Shared fixtures: small real HDF5 files in both layouts, labelled with ASE's EMT potential.

EMT (effective medium theory) has H, C, N, O parameters and gives consistent energies and
forces in milliseconds, so tests can write files whose forces are exactly -dE/dx.
"""

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.units import Hartree

SHARED_DIR = Path(os.environ.get("EKD_SHARED_DIR") or Path(__file__).resolve().parents[1] / ".." / "shared")
"""The project's shared material (``../shared`` beside the checkout; EKD_SHARED_DIR overrides)."""
SHARED_S66X8 = SHARED_DIR / "data" / "comp6v1" / "s66x8_wb97x6-31gd.h5"
ANI = "ekd_lightning.models.ani.ANIModel"
SCHNET = "ekd_lightning.models.schnet.SchNetModel"
"""Model classes, as a model config's ``_target_`` names them."""
MOLECULES = ["CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CHO", "CH3CH2OH"]


def emt_conformations(name: str, n_conf: int, rng: np.random.Generator, sigma: float = 0.08):
    """Random displacements of an ASE test molecule with EMT energies (Hartree) and forces (Hartree/Å)."""
    atoms = molecule(name)
    atoms.calc = EMT()
    coords, energies, forces = [], [], []
    base = atoms.get_positions()
    for _ in range(n_conf):
        atoms.set_positions(base + rng.normal(0, sigma, base.shape))
        coords.append(atoms.get_positions())
        energies.append(atoms.get_potential_energy() / Hartree)
        forces.append(atoms.get_forces() / Hartree)
    return atoms.numbers.astype(np.int64), np.array(coords), np.array(energies), np.array(forces)


def write_ani1x_file(path: Path, n_conf: int = 20, seed: int = 0, molecules=MOLECULES) -> Path:
    """A file in the ANI-1x release layout with keys ``emt.energy`` and ``emt.forces``."""
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        for name in molecules:
            numbers, coords, energies, forces = emt_conformations(name, n_conf, rng)
            group = f.create_group(name)
            group["atomic_numbers"] = numbers
            group["coordinates"] = coords
            group["emt.energy"] = energies
            group["emt.forces"] = forces
    return path


def write_comp6_file(path: Path, n_conf: int = 5, seed: int = 1) -> Path:
    """A file in the COMP6 layout (subset/molecule groups, ``species`` as bytes).

    Its ``forces`` are true EMT forces, so the root says ``forces_convention = "-dE/dx"`` (real
    COMP6 v1 files store gradients there and have no such attribute).
    """
    rng = np.random.default_rng(seed)
    subsets = {"gdb": ["CH3CH2OH", "CH3CHO"], "md": ["CH3OH"]}
    with h5py.File(path, "w") as f:
        f.attrs["forces_convention"] = "-dE/dx"
        for subset, names in subsets.items():
            for i, name in enumerate(names):
                numbers, coords, energies, forces = emt_conformations(name, n_conf, rng)
                group = f.create_group(f"{subset}/mol{i:02d}")
                from ase.data import chemical_symbols

                group["species"] = np.array([chemical_symbols[z].encode() for z in numbers], dtype="S2")
                group["coordinates"] = coords.astype(np.float32)
                group["energies"] = energies
                group["forces"] = forces.astype(np.float32)
    return path


@pytest.fixture(scope="session", autouse=True)
def _hash_cache(tmp_path_factory):
    """Tests record file hashes in a temporary folder, not in the user's cache."""
    os.environ["EKD_HASH_CACHE"] = str(tmp_path_factory.mktemp("sha256-cache"))


@pytest.fixture(scope="session")
def ani1x_file(tmp_path_factory) -> Path:
    return write_ani1x_file(tmp_path_factory.mktemp("data") / "ani1x_like.h5", n_conf=40)


@pytest.fixture(scope="session")
def comp6_file(tmp_path_factory) -> Path:
    return write_comp6_file(tmp_path_factory.mktemp("data") / "comp6_like.h5")


def write_label_file(path: Path, dataset: Path, energy_key: str, force_key: str, noise: float = 0.0,
                     seed: int = 0) -> Path:
    """A label file in the ekd-labels layout whose 'ensemble mean' is the dataset's own forces
    (plus optional Gaussian noise, Hartree/Å): lets student tests run without teachers."""
    rng = np.random.default_rng(seed)
    with h5py.File(dataset, "r") as src, h5py.File(path, "w") as out:
        out.attrs["format"] = "ekd-labels"
        out.attrs["version"] = 1
        out.attrs["dataset_path"] = str(dataset)
        out.attrs["energy_key"] = energy_key

        def copy(name, obj):
            if isinstance(obj, h5py.Group) and "coordinates" in obj:
                forces = obj[force_key][()]
                group = out.create_group(name)
                group["forces"] = (forces + rng.normal(0, noise, forces.shape)).astype(np.float32)
                group["forces_std"] = np.full(forces.shape, max(noise, 1e-4), np.float32)
                group["energy"] = obj[energy_key][()]
                group["energy_std"] = np.zeros(len(forces))
                group["labelled"] = np.ones(len(forces), bool)

        src.visititems(copy)
    return path


def train_tiny(data: Path, run_dir: Path, *overrides: str) -> Path:
    """Train with the real Lightning Trainer on an EMT fixture file (``emt.*`` keys, CSV logger,
    2 epochs unless overridden; seconds for tiny models); returns the run's ``best.ckpt``."""
    from hydra import compose, initialize_config_module

    from ekd_lightning.train.training import register_resolvers, run_training

    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[
            f"data.path={data}", "data.energy_key=emt.energy", "data.force_key=emt.forces",
            "data.batch_size=32", "logger=csv", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "trainer.max_epochs=2", *overrides,
        ])
    run_training(cfg, run_dir)
    return run_dir / "checkpoints" / "best.ckpt"


CUDA_SKIP = "needs a CUDA GPU (none visible)"
"""The one reason a test may be skipped in CI (which has no GPU)."""


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    """The accelerator a test runs on: every test that can run on CUDA takes this fixture and
    runs on the CPU and, where a GPU is visible, on CUDA (else skipped with CUDA_SKIP)."""
    import torch

    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip(CUDA_SKIP)
    return request.param
