"""Tests of the bundled GFN2-xTB dataset builder (tiny preset) and of the shipped files.

Building needs the ``[xtb]`` extra (tblite, rdkit): the ``tiny`` fixture skips without it; the
checks of the shipped files need neither.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from ase import Atoms

from ekd_lightning import bundled
from ekd_lightning.bundled import build, presets
from ekd_lightning.data import readers

ROOT_ATTRS = {"method", "program", "builder", "preset", "units_energy", "units_length",
              "units_forces"}
SUBSETS = {"xtb_nm_organics", "xtb_nm_drugs", "xtb_peptides", "xtb_pair_scans", "xtb_md_frames"}
COMP6_SUBSETS = ("animd", "drugbank", "gdb07to09", "gdb10to13", "tripeptides", "s66x8")
KCAL = 627.509474


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny preset built with two workers."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    return build.build(tmp_path_factory.mktemp("tiny2"), "tiny", workers=2, log=lambda m: None)


def _arrays(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    return out


def _comp6_groups(f: h5py.File) -> list[h5py.Group]:
    return [f[s][m] for s in f for m in f[s]]


def check_root(f: h5py.File, preset: str) -> None:
    assert ROOT_ATTRS <= set(f.attrs)
    assert f.attrs["method"] == "GFN2-xTB"
    assert f.attrs["program"].startswith("tblite ")
    assert f.attrs["builder"] == "ekd_lightning.bundled.build"
    assert f.attrs["preset"] == preset
    assert f.attrs["units_forces"] == "Hartree/angstrom"


def check_train(path: Path, preset: str) -> None:
    """ANI-1x release layout of the training file."""
    with h5py.File(path, "r") as f:
        check_root(f, preset)
        assert len(f) >= 3
        for name, g in f.items():
            assert set(g) == {"atomic_numbers", "coordinates", bundled.ENERGY_KEY, bundled.FORCE_KEY}
            z = g["atomic_numbers"][()]
            xyz, e, frc = g["coordinates"][()], g[bundled.ENERGY_KEY][()], g[bundled.FORCE_KEY][()]
            assert z.dtype == np.int64 and z.ndim == 1
            assert np.all(np.diff(z) <= 0), "atoms sorted by atomic number, descending"
            assert Atoms(numbers=z).get_chemical_formula(mode="hill") == name
            n_conf = len(e)
            assert n_conf >= 5
            assert xyz.dtype == e.dtype == frc.dtype == np.float64
            assert xyz.shape == frc.shape == (n_conf, len(z), 3)
            assert np.isfinite(e).all() and np.isfinite(frc).all() and np.isfinite(xyz).all()
            spread = (e.max() - e.min()) * KCAL
            assert 0.1 < spread < 150, f"{name}: energy spread {spread:.2f} kcal/mol"


def check_comp6(path: Path, preset: str) -> None:
    """COMP6 v1 layout of the test file."""
    with h5py.File(path, "r") as f:
        check_root(f, preset)
        assert set(f) == SUBSETS
        for subset in f:  # xTB data must not pass for COMP6 (wB97X) results in any table
            flat = subset.replace("_", "").replace("-", "").lower()
            assert not any(name in flat for name in COMP6_SUBSETS), subset
        for g in _comp6_groups(f):
            assert g.name.split("/")[-1].startswith("mol")
            assert set(g) == {"species", "coordinates", "energies", "forces"}
            species, xyz = g["species"][()], g["coordinates"][()]
            e, frc = g["energies"][()], g["forces"][()]
            assert species.dtype.kind == "S" and species.dtype.itemsize <= 2
            assert set(species.tolist()) <= {b"H", b"C", b"N", b"O"}
            assert xyz.dtype == frc.dtype == np.float32 and e.dtype == np.float64
            assert xyz.shape == frc.shape == (len(e), len(species), 3)
            assert 3 <= len(e) <= 20
            assert np.isfinite(e).all() and np.isfinite(frc).all()
            assert isinstance(g.attrs["smiles"], str)


def test_tiny_train_layout(tiny):
    check_train(tiny[0], "tiny")
    with h5py.File(tiny[0], "r") as f:
        assert all(build.formula(g.attrs["smiles"]) == name for name, g in f.items())


def test_tiny_comp6_layout(tiny):
    check_comp6(tiny[1], "tiny")


def test_test_set_is_out_of_sample(tiny):
    with h5py.File(tiny[0], "r") as ftr, h5py.File(tiny[1], "r") as fte:
        train = {build.canonical(g.attrs["smiles"]) for g in ftr.values()}
        test = {build.canonical(g.attrs["smiles"]) for g in _comp6_groups(fte)}
    assert train and test and not train & test
    assert not {build.canonical(s) for s in presets.TRAIN_SMILES} & {
        build.canonical(s) for v in presets.TEST_SMILES.values() for s in v}


def _fd_check(numbers, xyz, forces, atom, axis, h=1e-3):
    plus, minus = xyz.copy(), xyz.copy()
    plus[atom, axis] += h
    minus[atom, axis] -= h
    e_plus = build.xtb_energy_forces(numbers, plus)[0]
    e_minus = build.xtb_energy_forces(numbers, minus)[0]
    fd = -(e_plus - e_minus) / (2 * h)
    assert abs(fd - forces[atom, axis]) < 1e-4, (fd, forces[atom, axis])


def test_train_forces_are_minus_energy_gradient(tiny):
    with h5py.File(tiny[0], "r") as f:
        g = f["CH4O"]
        z, xyz = g["atomic_numbers"][()], g["coordinates"][-1]
        energy, forces = g[bundled.ENERGY_KEY][-1], g[bundled.FORCE_KEY][-1]
    assert build.xtb_energy_forces(z, xyz)[0] == pytest.approx(energy, abs=1e-7)
    assert np.abs(forces).max() > 1e-3  # a displaced geometry, not the minimum
    _fd_check(z, xyz, forces, atom=0, axis=0)
    _fd_check(z, xyz, forces, atom=len(z) - 1, axis=2)


def test_comp6_forces_are_minus_energy_gradient(tiny):
    from ase.data import atomic_numbers

    with h5py.File(tiny[1], "r") as f:
        g = f["xtb_peptides/mol00"]
        z = np.array([atomic_numbers[s.decode()] for s in g["species"][()]])
        xyz = g["coordinates"][1].astype(np.float64)
        energy, forces = g["energies"][1], g["forces"][1].astype(np.float64)
    assert build.xtb_energy_forces(z, xyz)[0] == pytest.approx(energy, abs=1e-7)
    _fd_check(z, xyz, forces, atom=2, axis=1)


def test_s66x8_scan_geometry(tiny):
    with h5py.File(tiny[1], "r") as f:
        xyz = f["xtb_pair_scans/mol00/coordinates"][()].astype(np.float64)
        e = f["xtb_pair_scans/mol00/energies"][()]
    dist = np.linalg.norm(xyz[:, :3, None] - xyz[:, None, 3:], axis=-1)  # water A x water B
    i, j = np.unravel_index(np.argmin(dist[2]), (3, 3))  # closest contact at scale 1.0
    assert (i == 0) != (j == 0), "the closest contact is O...H (atom 0 of each water is O)"
    np.testing.assert_allclose(dist[:, i, j] / dist[2, i, j], build.S66_SCALES, atol=1e-5)
    assert 1.7 < dist[2, i, j] < 2.2, "an O-H...O hydrogen bond"
    assert np.argmin(e) in (1, 2, 3), "the binding minimum is near the optimised separation"
    assert e[-1] > e.min()


def test_rerun_is_identical_with_other_worker_count(tiny, tmp_path):
    again = build.build(tmp_path, "tiny", workers=1, log=lambda m: None)
    for first, second in zip(tiny, again, strict=True):
        a, b = _arrays(first), _arrays(second)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert not list(tmp_path.glob("*.tmp"))


def test_project_readers_accept_files(tiny):
    train, _ = readers.read_molecules(tiny[0], bundled.ENERGY_KEY, bundled.FORCE_KEY)
    test, _ = readers.read_molecules(tiny[1], "energies", "forces")
    assert {r.key for r in train} == {"H2O", "CH4O", "C2H3N"}
    assert {r.subset for r in test} == SUBSETS


def test_shipped_default_files():
    assert bundled.TRAIN_FILE.parent == bundled.DATA_DIR
    check_train(bundled.TRAIN_FILE, "default")
    check_comp6(bundled.TEST_FILE, "default")
    with h5py.File(bundled.TRAIN_FILE, "r") as f:
        assert 40 <= len(f) <= 60
        assert sum(len(g[bundled.ENERGY_KEY]) for g in f.values()) >= 4000
    with h5py.File(bundled.TEST_FILE, "r") as f:
        assert 30 <= len(_comp6_groups(f)) <= 50
    size = bundled.TRAIN_FILE.stat().st_size + bundled.TEST_FILE.stat().st_size
    assert size < 8 * 2**20


def _smiles_of(preset: presets.Preset) -> set[str]:
    lists = [preset.train_smiles, preset.dimer_smiles, *preset.test_smiles.values()]
    return {build.canonical(s) for smiles in lists for s in smiles}


def test_second_preset_is_independent_of_the_bundled_data():
    """The ``second`` dataset shares no molecule (train, test or dimer) with the bundled one,
    keeps every training molecule (no formula skipped) and uses its own seeds."""
    pytest.importorskip("rdkit")
    second = presets.PRESETS["second"]
    assert not _smiles_of(second) & _smiles_of(presets.PRESETS["default"])
    train, test = build.plan_jobs(second, log=lambda m: None)
    assert len(train) == len(second.train_smiles) >= 40
    assert set(second.test_smiles) | {build.DIMER_SUBSET} == SUBSETS and len(test) >= 25
    assert second.seed("train", "O") != presets.PRESETS["default"].seed("train", "O")
    # the shipped default keeps the unsalted seeds its files were built with
    assert presets.PRESETS["default"].seed("train", "O") == presets.stable_seed("train", "O")


def test_seed_salt_gives_other_deterministic_samples():
    """A one-molecule build under a salt repeats itself exactly and differs from the unsalted.
    Built as the builder builds, in single-threaded worker processes (build.compute): with
    several OpenMP threads tblite's sums vary in the last bit, and MD amplifies that."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    import dataclasses

    tiny = presets.PRESETS["tiny"]
    salted = dataclasses.replace(tiny, seed_salt="second")
    runs = build.compute([build.Job("train", "H2O", "O", p) for p in (salted, salted, tiny)],
                         workers=1, log=lambda message: None)
    np.testing.assert_array_equal(runs[0].coordinates, runs[1].coordinates)
    np.testing.assert_array_equal(runs[0].forces, runs[1].forces)
    assert runs[0].coordinates.shape == runs[2].coordinates.shape
    assert np.abs(runs[0].coordinates - runs[2].coordinates).max() > 1e-3


def with_extra_frames(preset, extended, sampling_suffix: str, extra: int):
    """Methanol's training samples under ``preset`` and ``extended`` (the same preset with
    frames added): ``extended``'s arrays begin with ``preset``'s, bit for bit, and
    add ``extra`` frames named by ``sampling_suffix``. Returns both samples."""
    plain, more = build.compute([build.Job("train", "CH4O", "CO", p) for p in (preset, extended)],
                                workers=1, log=lambda message: None)
    n = len(plain.coordinates)
    np.testing.assert_array_equal(more.coordinates[:n], plain.coordinates)
    np.testing.assert_array_equal(more.energies[:n], plain.energies)
    assert more.sampling.endswith(sampling_suffix) and len(more.coordinates) == n + extra
    return plain, more


def test_stretched_frames_pull_one_terminal_bond_and_keep_the_other_arrays():
    """``stretch_frames`` appends frames in which exactly one terminal bond (an X-H here) is
    longer than in some training MD frame by 0.1-0.8 Å, labelled by xTB like the rest (energies
    far above the thermal frames'), and leaves the preset's other arrays untouched."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    import dataclasses

    tiny = presets.PRESETS["tiny"]
    plain, pulled = with_extra_frames(tiny, dataclasses.replace(tiny, stretch_frames=6),
                                      ",stretch0.1-0.8A:6", 6)
    n = len(plain.coordinates)
    md = plain.coordinates[: 2 * tiny.md_frames]
    for x in pulled.coordinates[n:]:
        moved = np.abs(md - x).max(axis=2) > 1e-9  # (n_md, n_atoms): atoms off each MD frame
        base = int(np.argmin(moved.sum(axis=1)))
        assert moved[base].sum() == 1  # one atom moved
        atom = int(np.flatnonzero(moved[base])[0])
        assert plain.numbers[atom] == 1  # CH3OH: every terminal atom is an H
        delta = np.linalg.norm(x[atom] - md[base][atom])
        assert 0.1 <= delta <= 0.8
        bond = np.linalg.norm(md[base] - md[base][atom], axis=1)
        anchor = int(np.argsort(bond)[1])  # its bonded partner: the nearest other atom
        assert np.linalg.norm(x[anchor] - x[atom]) == pytest.approx(bond[anchor] + delta)
    thermal = (plain.energies - plain.energies.min()) * KCAL
    assert ((pulled.energies[n:] - plain.energies.min()) * KCAL).max() > thermal.max() + 10


def test_hydrogen_shift_frames_put_one_h_on_a_shift_path_and_keep_the_other_arrays():
    """``shift_frames`` appends frames in which exactly one H of a training MD frame sits on the
    1,2-shift path between its heavy atom and that atom's heavy neighbour (CH3OH: C-H towards O,
    O-H towards C): in the X-Y-H plane of the base frame, 15-85% of the way along X-Y and
    0.7-1.2 Å off it, labelled by xTB far above the thermal frames; the other arrays (stretched
    frames included) are untouched."""
    pytest.importorskip("tblite")
    pytest.importorskip("rdkit")
    import dataclasses

    stretched = dataclasses.replace(presets.PRESETS["tiny"], stretch_frames=2)
    plain, moved_h = with_extra_frames(stretched, dataclasses.replace(stretched, shift_frames=6),
                                       ",hshift0.7-1.2A:6", 6)
    n = len(plain.coordinates)
    md = plain.coordinates[: 2 * stretched.md_frames]
    heavy = np.flatnonzero(plain.numbers > 1)  # C and O
    for x in moved_h.coordinates[n:]:
        moved = np.abs(md - x).max(axis=2) > 1e-9
        base = int(np.argmin(moved.sum(axis=1)))
        assert moved[base].sum() == 1
        h = int(np.flatnonzero(moved[base])[0])
        assert plain.numbers[h] == 1
        donor = heavy[np.argmin(np.linalg.norm(md[base][heavy] - md[base][h], axis=1))]
        acceptor = heavy[heavy != donor][0]
        axis = x[acceptor] - x[donor]
        along = np.dot(x[h] - x[donor], axis) / np.dot(axis, axis)
        off = x[h] - x[donor] - along * axis
        assert 0.15 <= along <= 0.85 and 0.7 <= np.linalg.norm(off) <= 1.2
        normal = np.cross(axis, md[base][h] - x[donor])  # the base frame's X-Y-H plane
        assert abs(np.dot(off, normal)) < 1e-9 * np.linalg.norm(normal)
    thermal = (plain.energies[: 2 * stretched.md_frames] - plain.energies.min()) * KCAL
    assert ((moved_h.energies[n:] - plain.energies.min()) * KCAL).min() > thermal.max()


def test_shift_paths_pair_each_h_with_its_atoms_heavy_neighbours():
    """Methanol (C0, O1, H2-H4 on C, H5 on O): each C-H towards O, the O-H towards C; no path
    to an H or to the H's own atom."""
    bonds = [(0, 1), (0, 2), (0, 3), (0, 4), (1, 5)]
    paths = build.shift_paths(np.array([6, 8, 1, 1, 1, 1]), bonds)
    assert sorted(paths) == [(0, 2, 1), (0, 3, 1), (0, 4, 1), (1, 5, 0)]


def test_terminal_bonds_point_from_anchor_to_terminal_atom():
    """Formaldehyde H2C=O: both C-H bonds and the C=O bond end on a terminal atom, pulled from C."""
    pairs = build.terminal_bonds(np.array([6, 8, 1, 1]), [(0, 1), (0, 2), (3, 0)])
    assert sorted(pairs) == [(0, 1), (0, 2), (0, 3)]


def test_ani1_normal_mode_sampling_puts_its_published_energy_in_the_modes():
    """ANI-1's generator: the harmonic energy sum_i K_i R_i^2 / 2 of a sample is a uniform
    fraction of 3/2 N_a k_B T (mean 3/4 N_a k_B T, never above 3/2 N_a k_B T), spread over the
    modes in random signs. Stiff modes of four far-apart atoms, so nothing is clipped or rejected."""
    numbers = np.ones(4, dtype=np.int64)
    positions = 5.0 * np.eye(4, 3)
    modes = np.eye(12)[:, :6]
    k = np.full(6, 0.5)
    rng = np.random.default_rng(0)
    frames = build.ani1_normal_mode_frames(numbers, positions, k, modes, rng, 4000, (300.0, 300.0))
    amplitudes = (frames - positions).reshape(len(frames), -1) @ modes  # (n, n_vib) Å
    energy = 0.5 * (k * amplitudes**2).sum(axis=1)
    bound = 1.5 * len(numbers) * build.KB_HARTREE * 300.0
    assert energy.max() <= bound * (1 + 1e-9)
    assert energy.mean() == pytest.approx(0.5 * bound, rel=0.04)
    assert 0.45 < (amplitudes > 0).mean() < 0.55
