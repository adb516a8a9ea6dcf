"""HDF5 readers: both layouts, the real S66x8 file, and bad input."""

import h5py
import numpy as np
import pytest

from conftest import SHARED_S66X8, write_ani1x_file
from ekd_lightning.core.errors import DataError
from ekd_lightning.data import detect_format, read_molecules


def test_ani1x_layout(ani1x_file):
    records, report = read_molecules(ani1x_file, "emt.energy", "emt.forces")
    by_key = {r.key: r for r in records}
    assert sorted(by_key) == sorted(["CH4", "H2O", "NH3", "CH3OH", "C2H6", "HCOOH", "CH3CHO", "CH3CH2OH"])
    ch4 = by_key["CH4"]
    assert ch4.atomic_numbers.tolist() == [6, 1, 1, 1, 1]
    assert ch4.coordinates.shape == (40, 5, 3) and ch4.forces.shape == (40, 5, 3)
    assert ch4.energies.dtype == np.float64
    assert report.conformations == 40 * 8 and report.dropped_nonfinite == 0
    assert detect_format(ani1x_file) == "ani1x"


def test_comp6_layout(comp6_file):
    records, _ = read_molecules(comp6_file, "energies", "forces")
    assert [r.key for r in records] == ["gdb/mol00", "gdb/mol01", "md/mol00"]
    assert records[0].subset == "gdb"
    assert records[2].atomic_numbers.tolist() == [6, 8, 1, 1, 1, 1]
    assert detect_format(comp6_file) == "comp6"


@pytest.mark.skipif(not SHARED_S66X8.exists(), reason="shared S66x8 file not present")
def test_real_s66x8_file():
    records, report = read_molecules(SHARED_S66X8, "energies", "forces")
    assert len(records) == 66 and report.conformations == 528
    for r in records:  # extra per-atom arrays (cm5, hirshfeld) are ignored
        assert r.forces.shape == r.coordinates.shape == (8, len(r.atomic_numbers), 3)
        assert set(r.atomic_numbers.tolist()) <= {1, 6, 7, 8}
    assert abs(records[0].energies[0] - (-152.78863962)) < 1e-6


def test_nan_energies_are_dropped_and_counted(tmp_path):
    path = write_ani1x_file(tmp_path / "d.h5", n_conf=6, molecules=["CH4", "H2O"])
    with h5py.File(path, "r+") as f:
        e = f["CH4/emt.energy"][()]
        e[[1, 4]] = np.nan
        f["CH4/emt.energy"][...] = e
    records, report = read_molecules(path, "emt.energy")
    assert report.dropped_nonfinite == 2
    ch4 = next(r for r in records if r.key == "CH4")
    assert ch4.conf_index.tolist() == [0, 2, 3, 5]
    assert ch4.coordinates.shape[0] == 4


def test_element_filter(tmp_path):
    path = write_ani1x_file(tmp_path / "d.h5", n_conf=3, molecules=["CH4", "H2O"])
    with h5py.File(path, "r+") as f:  # H2S: H2O's geometry with the oxygen made sulfur
        f.copy("H2O", "H2S")
        f["H2S/atomic_numbers"][0] = 16
    records, report = read_molecules(path, "emt.energy", elements=["H", "C", "N", "O"])
    assert sorted(r.key for r in records) == ["CH4", "H2O"]
    assert report.dropped_molecules_elements == {"H2S": 3}


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)
    return path


@pytest.fixture
def small(tmp_path):
    return write_ani1x_file(tmp_path / "bad.h5", n_conf=3, molecules=["CH4", "H2O"])


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda f: f["H2O"].__delitem__("coordinates"),
         "group '/H2O' has no dataset 'coordinates'; it has: ['atomic_numbers', 'emt.energy', 'emt.forces']"),
        (lambda f: f["H2O"].__delitem__("emt.energy"), "group '/H2O' has no dataset 'emt.energy'"),
        (lambda f: f.create_dataset("CH4/emt.energyx", data=[0.0]) and f["CH4"].__delitem__("emt.energy"),
         "it has: ['atomic_numbers', 'coordinates', 'emt.energyx', 'emt.forces']"),
        (lambda f: (f["H2O"].__delitem__("emt.energy"), f["H2O"].create_dataset("emt.energy", data=np.zeros(5))),
         "'emt.energy' has shape (5,), expected (3,)"),
        (lambda f: (f["H2O"].__delitem__("atomic_numbers"), f["H2O"].create_dataset("atomic_numbers", data=[8, 1])),
         "'coordinates' has shape (3, 3, 3), expected (n_conf, 2, 3)"),
        (lambda f: f["H2O/coordinates"].__setitem__((0, 0, 0), np.nan), "NaN/inf"),
        (lambda f: f["H2O/coordinates"].__setitem__((1, 1), f["H2O/coordinates"][1, 0]), "duplicated atom"),
        (lambda f: (f["H2O"].__delitem__("atomic_numbers"), f["H2O"].create_dataset("atomic_numbers", data=np.zeros(0, int))),
         "has no atoms"),
    ],
)
def test_bad_groups_name_file_group_and_problem(small, edit, message):
    _edit(small, edit)
    with pytest.raises(DataError) as info:
        read_molecules(small, "emt.energy", "emt.forces")
    assert str(small) in str(info.value) and message in str(info.value)


def test_forces_shape_mismatch(small):
    _edit(small, lambda f: (f["CH4"].__delitem__("emt.forces"), f["CH4"].create_dataset("emt.forces", data=np.zeros((3, 4, 3)))))
    with pytest.raises(DataError, match=r"'emt.forces' has shape \(3, 4, 3\), expected \(3, 5, 3\)"):
        read_molecules(small, "emt.energy", "emt.forces")


def test_all_nan_energies(small):
    def wipe(f):
        for g in ("CH4", "H2O"):
            f[f"{g}/emt.energy"][...] = np.nan
    _edit(small, wipe)
    with pytest.raises(DataError, match="no usable conformation"):
        read_molecules(small, "emt.energy")


def test_unknown_element_symbol(comp6_file, tmp_path):
    path = tmp_path / "c.h5"
    path.write_bytes(comp6_file.read_bytes())
    with h5py.File(path, "r+") as f:
        del f["md/mol00/species"]
        f["md/mol00/species"] = np.array([b"C", b"O", b"Xx", b"H", b"H", b"H"])
    with pytest.raises(DataError, match=r"group '/md/mol00' has unknown element 'Xx'"):
        read_molecules(path, "energies")


def test_not_hdf5_and_truncated(tmp_path, ani1x_file):
    text = tmp_path / "notes.h5"
    text.write_text("not an HDF5 file")
    with pytest.raises(DataError, match="notes.h5: not a readable HDF5 file"):
        read_molecules(text, "emt.energy")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(ani1x_file.read_bytes()[: ani1x_file.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated.h5"):
        read_molecules(truncated, "emt.energy")
    with pytest.raises(DataError, match="no such file"):
        read_molecules(tmp_path / "missing.h5", "emt.energy")


# --------------------------------------------------------------------------- COMP6 force sign
def _comp6_by_hand(path, convention=None):
    """One water in COMP6 layout; 'forces' holds arange values (Hartree/Å, sign as stored)."""
    with h5py.File(path, "w") as f:
        if convention is not None:
            f.attrs["forces_convention"] = convention
        g = f.create_group("sub/mol00")
        g["species"] = np.array([b"O", b"H", b"H"])
        g["coordinates"] = np.array([[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]] * 2, np.float32)
        g["energies"] = np.array([-76.4, -76.3])
        g["forces"] = np.arange(18, dtype=np.float32).reshape(2, 3, 3) - 9
    return path, np.arange(18.0).reshape(2, 3, 3) - 9


def test_comp6_without_attribute_is_read_as_gradient_and_warns_once(tmp_path, caplog):
    path, stored = _comp6_by_hand(tmp_path / "real_like.h5")
    with caplog.at_level("WARNING", logger="ekd_lightning.data.readers"):
        records, _ = read_molecules(path, "energies", "forces")
        read_molecules(path, "energies", "forces")  # second read of the same file: no new warning
    np.testing.assert_array_equal(records[0].forces, -stored)
    warnings = [r.getMessage() for r in caplog.records if "forces_convention" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0]
    assert "gradients dE/dx" in warnings[0] and "data.forces_are_gradients=false" in warnings[0]
    records, _ = read_molecules(path, "energies")  # energies only: no forces, nothing to say
    assert records[0].forces is None


@pytest.mark.parametrize("convention, sign", [("-dE/dx", 1), ("dE/dx", -1), (b"-dE/dx", 1)])
def test_comp6_root_attribute_decides(tmp_path, caplog, convention, sign):
    path, stored = _comp6_by_hand(tmp_path / "c.h5", convention)
    with caplog.at_level("WARNING", logger="ekd_lightning.data.readers"):
        records, _ = read_molecules(path, "energies", "forces")
    np.testing.assert_array_equal(records[0].forces, sign * stored)
    assert not caplog.records


@pytest.mark.parametrize("convention", [None, "-dE/dx"])
def test_comp6_force_sign_override(tmp_path, caplog, convention):
    path, stored = _comp6_by_hand(tmp_path / "c.h5", convention)
    with caplog.at_level("WARNING", logger="ekd_lightning.data.readers"):
        keep, _ = read_molecules(path, "energies", "forces", forces_are_gradients=False)
        flip, _ = read_molecules(path, "energies", "forces", forces_are_gradients=True)
    np.testing.assert_array_equal(keep[0].forces, stored)
    np.testing.assert_array_equal(flip[0].forces, -stored)
    assert not caplog.records


def test_force_sign_reaches_the_datamodule(tmp_path):
    from ekd_lightning.data import EKDDataModule

    path, stored = _comp6_by_hand(tmp_path / "c.h5")
    for flag, sign in ((False, 1), (None, -1)):
        dm = EKDDataModule(str(path), "energies", "forces", "comp6", val_fraction=0,
                           test_fraction=0, forces_are_gradients=flag)
        dm.setup()
        graph = dm.datasets["train"][0]
        np.testing.assert_array_equal(graph.forces.numpy(), sign * stored[graph.conf.item()])


def test_bad_forces_convention_attribute(tmp_path):
    path, _ = _comp6_by_hand(tmp_path / "c.h5", "gradient")
    with pytest.raises(DataError, match=r"forces_convention='gradient' is not one of"):
        read_molecules(path, "energies", "forces")


def test_ani1x_layout_forces_are_kept(ani1x_file, caplog):
    with caplog.at_level("WARNING", logger="ekd_lightning.data.readers"):
        records, _ = read_molecules(ani1x_file, "emt.energy", "emt.forces")
    with h5py.File(ani1x_file, "r") as f:
        np.testing.assert_array_equal(records[0].forces, f[records[0].key]["emt.forces"][()])
    assert not caplog.records


def test_shipped_comp6_file_holds_true_forces():
    from ekd_lightning.bundled import TEST_FILE

    with h5py.File(TEST_FILE, "r") as f:
        assert f.attrs["forces_convention"] == "-dE/dx"
        stored = f["xtb_pair_scans/mol00/forces"][()]
    records, _ = read_molecules(TEST_FILE, "energies", "forces")
    got = next(r for r in records if r.key == "xtb_pair_scans/mol00")
    np.testing.assert_array_equal(got.forces, stored)


@pytest.mark.skipif(not SHARED_S66X8.exists(), reason="shared S66x8 file not present")
def test_real_comp6_forces_become_minus_gradient():
    """COMP6 v1 stores dE/dx under 'forces': read with the default, work = -ΔE (slope +1)."""
    from ekd_lightning.analysis.evaluate import force_energy_consistency

    with h5py.File(SHARED_S66X8, "r") as f:
        assert "forces_convention" not in f.attrs
    records, _ = read_molecules(SHARED_S66X8, "energies", "forces")
    assert force_energy_consistency(records) == pytest.approx(1.0, abs=0.1)
    raw, _ = read_molecules(SHARED_S66X8, "energies", "forces", forces_are_gradients=False)
    assert force_energy_consistency(raw) == pytest.approx(-1.0, abs=0.1)


def test_builder_writes_forces_convention(tmp_path):
    from ekd_lightning.bundled import build

    sample = build.Sample("sub/mol00", "O", np.array([8, 1, 1]), np.zeros((1, 3, 3)) + [[0], [0.96], [1.9]],
                          np.array([-5.0]), np.full((1, 3, 3), 0.25), "test")
    path = tmp_path / "built.h5"
    build.write_comp6(path, [sample], {"method": "test"})
    with h5py.File(path, "r") as f:
        assert f.attrs["forces_convention"] == "-dE/dx"
    records, _ = read_molecules(path, "energies", "forces")
    np.testing.assert_array_equal(records[0].forces, sample.forces)


def test_close_atoms_found_block_by_block(tmp_path, monkeypatch):
    """The geometry check works on blocks of conformations (bounded memory) and still names
    the conformation's index in the group and the atom pair."""
    from ekd_lightning.data import readers

    path = write_ani1x_file(tmp_path / "a.h5", n_conf=20, molecules=["CH3OH"])
    with h5py.File(path, "r+") as f:
        coords = f["CH3OH/coordinates"]
        coords[13, 4] = coords[13, 2] + 0.05
    monkeypatch.setattr(readers, "GEOMETRY_CHUNK", 2 * 15)  # 2 conformations of 6 atoms a block
    with pytest.raises(DataError, match=r"conformation 13: atoms 2 and 4 are 0\.087 Å apart"):
        read_molecules(path, "emt.energy")


def test_dataset_hashed_once_per_file_version(tmp_path, monkeypatch):
    """cached_sha256 remembers a file's hash across processes (the cache folder), keyed by
    path, size and mtime: a new process does not hash again; a rewritten file is hashed again."""
    import hashlib
    import os

    from ekd_lightning.core import hashing

    monkeypatch.setenv("EKD_HASH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "d.h5"
    path.write_bytes(b"first version")
    calls = []
    original = hashing.file_sha256
    monkeypatch.setattr(hashing, "file_sha256", lambda p: calls.append(p) or original(p))
    assert hashing.cached_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    hashing._sha256_cached.cache_clear()  # as a new process
    assert hashing.cached_sha256(path) == hashlib.sha256(b"first version").hexdigest()
    assert len(calls) == 1
    path.write_bytes(b"other version")
    os.utime(path, ns=(1, 1))
    assert hashing.cached_sha256(path) == hashlib.sha256(b"other version").hexdigest()
    assert len(calls) == 2
