"""HDF5 readers: both layouts, the real S66x8 file, and bad input."""

import h5py
import numpy as np
import pytest

from conftest import SHARED_S66X8, write_ani1x_file
from ekd_lightning.data import detect_format, read_molecules
from ekd_lightning.errors import DataError


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
        (lambda f: f["H2O"].__delitem__("coordinates"), None),  # then H2O is not a molecule group
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
    if message is None:  # a group without coordinates is skipped, the rest still loads
        records, _ = read_molecules(small, "emt.energy")
        assert [r.key for r in records] == ["CH4"]
        return
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
