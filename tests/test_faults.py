"""Fault injection (issue 28): the promises hold under threads, kills, full or read-only disks,
concurrent commands and implausible input. Each probe runs the real command (a subprocess, as a
user would) or the real code path; a failure of the operating system is injected by patching
the one call that writes (``os.replace``, ``torch.save``) inside a real command, since the tests
run as root (permission bits are ignored) and cannot mount a small tmpfs.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import ANI, write_ani1x_file
from ekd_lightning.bundled import DATA_DIR
from ekd_lightning.distill.run import STOP_ENV
from ekd_lightning.task.module import PotentialModule
from ekd_lightning.train.callbacks import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = DATA_DIR / "xtb_train.h5"
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SMALL = "model.hidden={H:[16],C:[16],N:[16],O:[16]}"
ENV = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, STOP_ENV)}


def command(*argv: str, cwd: Path, env: dict | None = None, patch: str = "",
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``ekd-<argv[0]> argv[1:]`` in a fresh interpreter, after the Python lines ``patch``
    (the injected fault, if any)."""
    entry = {"train": "cli:train", "distill": "cli:distill", "evaluate": "analysis.evaluate:main",
             "predict": "inference.predict:main", "md": "analysis.md:main"}[argv[0]]
    module, function = entry.split(":")
    script = "\n".join([
        "import sys", textwrap.dedent(patch), f"from ekd_lightning.{module} import {function}",
        f"sys.argv = {['ekd-' + argv[0], *argv[1:]]!r}", f"result = {function}()",
        "sys.exit(result if isinstance(result, int) else 0)"])
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**ENV, **(env or {})})


def one_line_error(run: subprocess.CompletedProcess) -> str:
    """The command's error line, checked: exit 2, ``error: ...`` as the last stderr line, no
    traceback."""
    assert run.returncode == 2, (run.returncode, run.stderr[-3000:])
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "error: " in last, run.stderr[-3000:]
    return last


ENOSPC = """
import errno, os
_replace = os.replace
def _full(src, dst, *a, **k):
    if str(dst).endswith({suffix!r}):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
    return _replace(src, dst, *a, **k)
os.replace = _full
"""
"""Patch: renaming a finished temporary file onto a name ending with ``suffix`` fails with a full
disk (the last step of every atomic write)."""


# =========================================================================== exact resume
def test_killed_default_training_resumes_to_identical_weights_and_metrics(tmp_path):
    """The issue's probe on the bundled data, with every default (feature cache on): killed
    (SIGKILL) in epoch 2, restarted, it ends with the uninterrupted run's bits. Before the cache
    was filled in fixed batches, epoch 2's val/loss already differed (issue 28: 2.748150 vs
    2.748415 with the default model)."""
    args = ["train", "stage=baseline", "trainer.max_epochs=2", SMALL, *QUIET]
    whole = command(*args, "run_name=whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = command(*args, "run_name=r", cwd=tmp_path, env={KILL_ENV: "1:5"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = command(*args, "run_name=r", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    runs = tmp_path / "runs"
    history = [json.loads((runs / name / "history.json").read_text()) for name in ("whole", "r")]
    assert [h["val/loss"] for h in history[0]] == [h["val/loss"] for h in history[1]]
    metrics = [json.loads((runs / name / "metrics.json").read_text()) for name in ("whole", "r")]
    assert {k: v for k, v in metrics[0].items() if k.startswith("test/")} == \
        {k: v for k, v in metrics[1].items() if k.startswith("test/")}
    weights = [torch.load(runs / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for name in ("whole", "r")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# =========================================================================== labels
@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> list[Path]:
    """Two random small ANI teachers for the bundled data, in the checkpoint layout."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        module = PotentialModule({"_target_": ANI, "hidden": {e: [16] for e in "HCNO"}},
                                 ["H", "C", "N", "O"], [-0.51, -2.13, -2.91, -4.06], 0.005)
        path = folder / f"t{seed}.ckpt"
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
        paths.append(path)
    return paths


def distill(teachers, out: str, cwd: Path, threads: int, **env):
    """``ekd-distill`` on the bundled data, ``threads`` intra-op threads (OMP_NUM_THREADS)."""
    return command("distill", f"teachers=[{','.join(map(str, teachers))}]", f"out={out}",
                   "chunk_size=512", "hydra.run.dir=.", cwd=cwd,
                   env={"OMP_NUM_THREADS": str(threads), "SOURCE_DATE_EPOCH": "0", **env})


def test_label_file_is_the_same_bytes_on_1_and_2_threads_and_after_a_kill(teachers, tmp_path):
    """The same teachers and data give the same bytes whatever the thread count or an
    interruption (the labelling runs its math on one thread; a reduction split over two
    threads used to change the last bit of float32 forces in a few groups)."""
    one = distill(teachers, "one.h5", tmp_path, 1)
    two = distill(teachers, "two.h5", tmp_path, 2)
    stopped = distill(teachers, "cut.h5", tmp_path, 2, **{STOP_ENV: "3"})
    assert stopped.returncode != 0 and not (tmp_path / "cut.h5").exists()
    resumed = distill(teachers, "cut.h5", tmp_path, 2)
    for run in (one, two, resumed):
        assert run.returncode == 0, run.stderr[-3000:]

    def content(name):  # the file's data: the out path and the run's resumption aside
        with h5py.File(tmp_path / name) as f:
            arrays = {}
            f.visititems(lambda k, v: arrays.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
            return arrays

    reference = content("one.h5")
    for name in ("two.h5", "cut.h5"):
        other = content(name)
        assert other.keys() == reference.keys()
        assert [k for k in reference if reference[k].tobytes() != other[k].tobytes()] == []
    assert "3 of 11 chunks already labelled" in resumed.stdout + resumed.stderr  # it resumed


def test_two_distills_with_the_same_out_label_once(teachers, tmp_path):
    """Run together, the second waits for the first (a lock beside the label file) and reuses
    its finished file; before the lock one died with a FileNotFoundError on a shard."""
    args = [sys.executable, "-c", "from ekd_lightning.cli import distill; distill()",
            f"teachers=[{','.join(map(str, teachers))}]", "out=x.h5", "chunk_size=512",
            "hydra.run.dir=."]
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    logs = [out + err for out, err in outs]
    assert sum("already holds these labels" in log for log in logs) == 1, logs
    assert any("another process is making it; waiting" in log for log in logs), logs
    assert not (tmp_path / "x.h5.shards").exists() and (tmp_path / "x.h5").is_file()


# =========================================================================== implausible input
def test_energies_in_kcal_per_mol_warn_with_the_likely_unit(tmp_path, caplog):
    from ekd_lightning.data import EKDDataModule

    path = tmp_path / "kcal.h5"
    with h5py.File(BUNDLED) as src, h5py.File(path, "w") as f:
        for key in list(src)[:30]:
            src.copy(src[key], f, key)
            f[key]["gfn2_xtb.energy"][...] = src[key]["gfn2_xtb.energy"][()] * 627.5
    with caplog.at_level("WARNING"):
        EKDDataModule(path=str(path), file_format="ani1x", energy_key="gfn2_xtb.energy").setup()
    assert "the energies look like kcal/mol, not Hartree" in caplog.text
    assert str(path) in caplog.text and "divide by 627.509" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        EKDDataModule(path=str(BUNDLED), file_format="ani1x", energy_key="gfn2_xtb.energy").setup()
    assert "look like" not in caplog.text  # the Hartree file itself: no warning


H_ON_O = "3\n\nO 0.0 0.0 0.0\nH 0.0 0.0 0.01\nH 0.0 0.76 0.59\n"


def test_atoms_on_top_of_each_other_are_refused_by_predict_md_and_calculator(teachers, tmp_path):
    from ase.build import molecule

    from ekd_lightning import EKDCalculator
    from ekd_lightning.core.errors import DataError

    (tmp_path / "bad.xyz").write_text(H_ON_O)
    run = command("predict", str(teachers[0]), "bad.xyz", "--out", "out.extxyz", cwd=tmp_path)
    line = one_line_error(run)
    assert "bad.xyz: structure 0 (H2O): atoms 0 (O) and 1 (H) are 0.010 Å apart" in line
    assert not (tmp_path / "out.extxyz").exists()
    run = command("md", "--checkpoints", str(teachers[0]), "--structures", "bad.xyz",
                  "--steps", "2", cwd=tmp_path)
    assert "atoms 0 (O) and 1 (H) are 0.010 Å apart" in one_line_error(run)
    atoms = molecule("H2O")
    atoms.positions[1] = atoms.positions[0] + [0, 0, 0.01]
    atoms.calc = EKDCalculator.from_checkpoint(teachers[0])
    with pytest.raises(DataError, match=r"atoms 0 \(O\) and 1 \(H\) are 0.010 Å apart"):
        atoms.get_forces()



def test_atoms_on_each_others_periodic_image_are_refused(teachers):
    """In a periodic cell, an atom 0.02 Å from another's image (10 Å apart in the box) is as
    meaningless as one on top of it (mutation: checking positions without the images)."""
    from ase import Atoms

    from ekd_lightning import EKDCalculator
    from ekd_lightning.core.errors import DataError

    atoms = Atoms("OH", positions=[[0.01, 5, 5], [9.99, 5, 5]], cell=[10, 10, 10], pbc=True)
    atoms.calc = EKDCalculator.from_checkpoint(teachers[0])
    with pytest.raises(DataError, match=r"atoms 0 \(O\) and 1 \(H\) are 0.020 Å apart "
                                        r"\(through the periodic cell\)"):
        atoms.get_forces()
    atoms.positions[1, 0] = 8.0  # 2 Å away through the cell: a fine structure
    assert atoms.get_forces().shape == (2, 3)


# =========================================================================== outputs
def test_evaluate_finds_an_unwritable_out_before_the_work(teachers, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    patch = ("import ekd_lightning.analysis.evaluate as e\n"
             "e.load_named_models = lambda *a: (_ for _ in ()).throw(SystemExit('worked first'))")
    run = command("evaluate", "--checkpoints", str(teachers[0]), "--data", str(BUNDLED),
                  "--energy-key", "gfn2_xtb.energy", "--force-key", "gfn2_xtb.forces",
                  "--out", "afile/results", cwd=tmp_path, patch=patch)
    line = one_line_error(run)
    assert "afile/results" in line and "(ENOTDIR)" in line and "write to another folder" in line


def test_evaluate_on_a_full_disk_prints_its_table_and_keeps_the_old_results(teachers, tmp_path):
    small = tmp_path / "small.h5"
    with h5py.File(BUNDLED) as src, h5py.File(small, "w") as f:
        for key in list(src)[:5]:
            src.copy(src[key], f, key)
    out = tmp_path / "results"
    out.mkdir()
    (out / "metrics.json").write_text('{"old": true}')
    run = command("evaluate", "--checkpoints", f"a={teachers[0]}", "--data", str(small),
                  "--energy-key", "gfn2_xtb.energy", "--force-key", "gfn2_xtb.forces",
                  "--no-plots", "--out", str(out), cwd=tmp_path,
                  patch=ENOSPC.format(suffix="metrics.json"))
    line = one_line_error(run)
    assert "metrics.json: No space left on device (ENOSPC): free some space" in line
    assert "force_mae" in run.stdout and "\n| a | all | 5 |" in run.stdout  # the table of model a
    assert (out / "metrics.json").read_text() == '{"old": true}'
    assert not list(out.glob(".*.tmp"))


TINY_DATA = ["data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=8",
             "trainer.max_epochs=1", "model.hidden={H:[8],C:[8],N:[8],O:[8]}", *QUIET]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_ani1x_file(tmp_path_factory.mktemp("tiny") / "tiny.h5", n_conf=8,
                            molecules=["CH4", "H2O", "NH3", "CH3OH"])


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory) -> Path:
    """A finished 1-epoch run made by ekd-train with umask 022."""
    cwd = tmp_path_factory.mktemp("tinyrun")
    run = command("train", f"data.path={tiny}", *TINY_DATA, "run_name=t", cwd=cwd,
                  patch="import os; os.umask(0o022)")
    assert run.returncode == 0, run.stderr[-3000:]
    return cwd / "runs" / "t"


def test_run_store_files_are_readable_by_others(tiny_run):
    files = [p for p in tiny_run.rglob("*") if p.is_file() and p.name != ".lock"]
    names = {p.name for p in files}
    assert {"best.ckpt", "last.ckpt", "metrics.json", "run_info.json", "history.json",
            "train.log"} <= names
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: "0o644" for p in files}


def test_training_on_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tiny, tmp_path):
    """The disk fills up while epoch 1's last.ckpt is written: one line, and epoch 0's
    last.ckpt is intact (a restart resumes from it)."""
    patch = ENOSPC.replace("if str(dst)", "_full.n = getattr(_full, 'n', 0) + str(dst).endswith({suffix!r})\n"
                           "    if _full.n == 2 and str(dst)").format(suffix="last.ckpt")
    run = command("train", f"data.path={tiny}", *TINY_DATA, "trainer.max_epochs=2", "run_name=t",
                  cwd=tmp_path, patch=patch)
    line = one_line_error(run)
    assert "last.ckpt: No space left on device (ENOSPC): free some space" in line
    checkpoints = tmp_path / "runs" / "t" / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["epoch"] == 0
    assert not list(checkpoints.glob(".*.tmp"))


def test_training_refuses_a_full_disk_before_the_first_epoch(tiny, tmp_path):
    patch = ("import shutil, collections\n"
             "shutil.disk_usage = lambda p: collections.namedtuple('u', 'total used free')(1, 1, 1000)")
    run = command("train", f"data.path={tiny}", *TINY_DATA, "run_name=t", cwd=tmp_path, patch=patch)
    line = one_line_error(run)
    assert "runs/t: 0.0 MiB free, the checkpoints and metrics need about" in line
    assert not (tmp_path / "runs" / "t" / "checkpoints").exists()


def train_in_process(data: Path, run_dir: Path, *overrides: str) -> None:
    """``run_training`` of the tiny config (in this process: no interpreter start)."""
    from hydra import compose, initialize_config_module

    from ekd_lightning.train.training import register_resolvers, run_training

    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"data.path={data}", *TINY_DATA, *overrides])
    run_training(cfg, run_dir)


@pytest.mark.parametrize("damage, expected", [
    (lambda path: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
     "cannot read checkpoint (corrupt or truncated?)"),
    (lambda path: path.write_bytes(b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."),
     "refused: it holds more than weights and plain data"),
], ids=["truncated", "planted"])
def test_bad_last_checkpoint_on_resume_names_it_and_says_to_move_it(tiny, tiny_run, tmp_path,
                                                                     damage, expected):
    import shutil

    from ekd_lightning.core.errors import CheckpointError

    run_dir = tmp_path / "t"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "metrics.json").unlink()
    last = run_dir / "checkpoints" / "last.ckpt"
    damage(last)
    with pytest.raises(CheckpointError) as info:
        train_in_process(tiny, run_dir, "trainer.max_epochs=2", "run_name=t")
    message = str(info.value)
    assert message.startswith(f"{last}: {expected}") and "\n" not in message
    assert f"move it away (e.g. mv {last} {last}.bad)" in message and "weights_only" not in message


@pytest.mark.parametrize("override, error, expected", [
    ("data.batch_size=0", "ConfigError", "data.batch_size=0: must be a positive whole number of conformations per batch"),
    ("optim.lr=-1", "ConfigError", "optim.lr=-1: must be a learning rate >= 0 (0 freezes the weights), e.g. optim.lr=0.001"),
    ("data.path=FOLDER", "DataError", "FOLDER: is a folder, not an HDF5 file: name the .h5 file itself"),
])
def test_bad_settings_name_the_key_before_any_work(tiny, tmp_path, override, error, expected):
    from ekd_lightning.core import errors

    override, expected = (s.replace("FOLDER", str(tmp_path)) for s in (override, expected))
    with pytest.raises(getattr(errors, error)) as info:
        train_in_process(tiny, tmp_path / "run", override)
    assert str(info.value) == expected or str(info.value).startswith(expected)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_cli_turns_project_errors_into_one_line(tiny, tmp_path):
    run = command("train", f"data.path={tiny}", *TINY_DATA, "optim.lr=-1", "run_name=t", cwd=tmp_path)
    assert one_line_error(run) == "error: optim.lr=-1: must be a learning rate >= 0 (0 freezes the weights), e.g. optim.lr=0.001"


def test_predict_refuses_to_overwrite_without_force(tiny_run, tmp_path):
    from ase.build import molecule
    from ase.io import read, write

    write(tmp_path / "in.xyz", molecule("CH4"))
    (tmp_path / "out.extxyz").write_text("mine")
    ckpt = str(tiny_run / "checkpoints" / "best.ckpt")
    run = command("predict", ckpt, "in.xyz", "--out", "out.extxyz", cwd=tmp_path)
    assert "out.extxyz already exists: pass --force to replace it" in one_line_error(run)
    assert (tmp_path / "out.extxyz").read_text() == "mine"
    run = command("predict", ckpt, "in.xyz", "--out", "out.extxyz", "--force", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert np.isfinite(read(tmp_path / "out.extxyz").get_forces()).all()
