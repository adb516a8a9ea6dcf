"""The installed product (issue 14): a wheel built from the checkout, installed into a fresh
virtual environment outside it, runs its console commands from any folder with the packaged
configs, plus a user's own config folder through Hydra's search path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import write_ani1x_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=8",
        "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_epochs=1"]
MY_MODEL = """# a user's own model config, outside the package
name: tiny_ani
_target_: ekd_lightning.models.ani.ANIModel
aev: null
hidden: {H: [8], C: [8], N: [8], O: [8]}
activation_alpha: 0.1
"""


def run(*command, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with only the wheel installed; the dependencies come from
    this environment's site-packages through a .pth file (no network)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("src", "conf"):  # conf/: the Hydra configs, installed as ekd_lightning.conf
        shutil.copytree(ROOT / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", root / "dist", source, cwd=root)
    (wheel,) = (root / "dist").glob("ekd_lightning-*.whl")
    env_dir = root / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", env_dir, cwd=root)
    python = env_dir / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                  cwd=root).stdout.strip()
    # a plain path line: the project environment's own .pth files (its editable install of
    # ekd-lightning) are not processed, so ekd_lightning can only come from the wheel
    Path(purelib, "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps",
        "--no-index", wheel, cwd=root)
    return env_dir


@pytest.mark.slow
def test_wheel_commands_run_outside_the_checkout(venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["WANDB_MODE"] = "offline"
    probe = ("import ekd_lightning, importlib.metadata as m; print(ekd_lightning.__file__); "
             "eps = {e.name: e for e in m.entry_points(group='console_scripts')}; "
             "print(sorted(n for n in eps if n.startswith('ekd-'))); "
             "[eps[n].load() for n in eps if n.startswith('ekd-')]")
    where, scripts = run(venv / "bin" / "python", "-c", probe, cwd=tmp_path, env=env).stdout.split("\n")[:2]
    assert where.startswith(str(venv)), where
    assert scripts == str(["ekd-distill", "ekd-evaluate", "ekd-export", "ekd-md", "ekd-predict",
                           "ekd-train"])

    job = run(venv / "bin" / "ekd-train", "experiment=ekd", "--cfg", "job", cwd=tmp_path, env=env)
    pipeline = job.stdout[job.stdout.index("pipeline:"):]
    assert "teachers:" in pipeline and "first_seed: 100" in pipeline and "xtb_comp6.h5" in job.stdout
    labels = run(venv / "bin" / "ekd-distill", "teachers.dir=runs", "--cfg", "job", cwd=tmp_path,
                 env=env)
    assert "dir: runs" in labels.stdout

    data = write_ani1x_file(tmp_path / "tiny.h5", n_conf=8, molecules=["CH4", "H2O", "NH3", "CH3OH"])
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    (tmp_path / "my_conf" / "model" / "tiny_ani.yaml").write_text(MY_MODEL)
    run(venv / "bin" / "ekd-train", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
        "model=tiny_ani", f"data.path={data}", *TINY, cwd=tmp_path, env=env)
    run_dir = tmp_path / "runs" / "teacher-tiny_ani-seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["test/energy_mae"] > 0 and (run_dir / "checkpoints" / "best.ckpt").is_file()
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["config"]["model"]["hidden"]["H"] == [8]  # the user's config was used
    assert list(tmp_path.glob("*.egg-info")) == [] and not (ROOT / "build").exists()


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages by hand (its package-dir maps ekd_lightning.conf to the
    top-level conf/, which packages.find cannot), the folders of data files alone included (so
    setuptools neither warns nor guesses): a package missing from the list would be missing from
    the wheel."""
    import tomllib
    from setuptools import find_namespace_packages

    def folders(root: Path, prefix: str) -> set[str]:
        return {f"{prefix}.{name}" if name else prefix
                for name in ["", *find_namespace_packages(root, exclude=["*__pycache__*"])]}

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = (folders(ROOT / "src" / "ekd_lightning", "ekd_lightning")
             | folders(ROOT / "conf", "ekd_lightning.conf"))
    assert listed == found
