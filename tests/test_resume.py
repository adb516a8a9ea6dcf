"""Safe resume (issue 14): a run folder is resumed, extended or skipped only when the run it
holds computes the same thing; otherwise the new run is refused with the differing keys."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from conftest import write_ani1x_file, write_label_file
from ekd_lightning.core.errors import ConfigError
from ekd_lightning.train.training import computed_config, register_resolvers, run_training

TINY = [
    "data.energy_key=emt.energy", "data.force_key=emt.forces", "data.batch_size=8", "logger=csv",
    "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "optim.lr=3e-3",
    "trainer.max_epochs=2", "model.hidden={H:[8],C:[8],N:[8],O:[8]}", "stage=student",
]


def make_cfg(data_file, labels, *overrides):
    register_resolvers()
    with initialize_config_module(config_module="ekd_lightning.conf", version_base="1.3"):
        return compose("train", overrides=[f"data.path={data_file}", f"distill.labels={labels}",
                                           *TINY, *overrides])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    data = write_ani1x_file(folder / "tiny.h5", n_conf=8, molecules=["CH4", "H2O", "NH3", "CH3OH"])
    labels = write_label_file(folder / "labels.h5", data, "emt.energy", "emt.forces", noise=1e-3)
    return data, labels


@pytest.fixture(scope="module")
def student(files, tmp_path_factory):
    """A finished 2-epoch student run on tiny data."""
    run_dir = tmp_path_factory.mktemp("student") / "run"
    return run_dir, run_training(make_cfg(*files), run_dir)


def copy_run(student, tmp_path, finished: bool = True) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(student[0], run_dir)
    if not finished:  # as if killed after its last checkpoint
        (run_dir / "metrics.json").unlink()
    return run_dir


def test_same_config_resumes_and_reaches_the_same_metrics(files, student, tmp_path, caplog):
    run_dir = copy_run(student, tmp_path, finished=False)
    with caplog.at_level("INFO"):
        metrics = run_training(make_cfg(*files, "trainer.enable_progress_bar=true"), run_dir)
    assert "resuming from" in caplog.text  # a display setting does not block resuming
    assert metrics["test/force_mae"] == student[1]["test/force_mae"]


@pytest.mark.parametrize("override, change", [
    ("loss.forces.weight=1.0", "loss.forces.weight: 0.1 -> 1.0"),
    ("optim.lr=1e-3", "optim.lr: 0.003 -> 0.001"),
    ("distill.labels=OTHER", "distill.labels: LABELS -> OTHER"),
    ("data.path=OTHER", "data.path: DATA -> OTHER"),
    ("trainer.max_epochs=1", "trainer.max_epochs: 2 -> 1"),
])
@pytest.mark.parametrize("finished", [True, False])
def test_other_config_is_refused_with_the_differing_keys(files, student, tmp_path, override,
                                                         change, finished):
    run_dir = copy_run(student, tmp_path, finished)
    other = tmp_path / "other.h5"
    shutil.copy(files[0] if override.startswith("data") else files[1], other)
    override, change = override.replace("OTHER", str(other)), change.replace("OTHER", str(other))
    change = change.replace("LABELS", str(files[1])).replace("DATA", str(files[0]))
    before = {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as info:
        run_training(make_cfg(*files, override), run_dir)
    message = str(info.value)
    assert f"{run_dir} holds a run made with another config ({change})" in message
    assert "another run_name=... (or hydra.run.dir=...), or remove" in message
    assert "\n" not in message
    assert {p.name: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_changed_label_file_content_is_refused(files, student, tmp_path):
    run_dir = copy_run(student, tmp_path, finished=True)
    labels = tmp_path / "labels.h5"  # same config (path), other content
    write_label_file(labels, files[0], "emt.energy", "emt.forces", noise=5e-3)
    info = json.loads((run_dir / "run_info.json").read_text())
    info["computed_config"]["distill"]["labels"] = str(labels)
    info["labels"] = str(labels)
    (run_dir / "run_info.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match=r"holds a run made with other input files \(labels_sha256: "):
        run_training(make_cfg(files[0], labels), run_dir)


def test_finished_same_config_is_skipped(files, student, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    run_dir = copy_run(student, tmp_path)
    monkeypatch.setattr(pl, "Trainer", lambda *a, **k: pytest.fail("a finished run was trained again"))
    assert run_training(make_cfg(*files, "logger=wandb", "resume=true"), run_dir) == student[1]


def test_raising_max_epochs_extends_the_run_as_if_trained_that_long(files, student, tmp_path):
    run_dir = copy_run(student, tmp_path)
    extended = run_training(make_cfg(*files, "trainer.max_epochs=3"), run_dir)
    fresh = run_training(make_cfg(*files, "trainer.max_epochs=3"), tmp_path / "fresh")
    assert extended["test/force_mae"] == fresh["test/force_mae"] != student[1]["test/force_mae"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["computed_config"]["trainer"]["max_epochs"] == 3


def test_display_and_unused_keys_are_not_part_of_what_a_run_computes(files):
    base = computed_config(make_cfg(*files))
    assert computed_config(make_cfg(*files, "trainer.enable_progress_bar=true", "logger=wandb",
                                    "resume=false", "distill.out=x.h5",
                                    "callbacks=[lr_monitor]")) == base
    teacher = computed_config(make_cfg(*files, "stage=teacher"))
    assert "distill" not in teacher  # a teacher reads no labels
    assert computed_config(make_cfg(*files, "loss.forces.weight=0.2")) != base
