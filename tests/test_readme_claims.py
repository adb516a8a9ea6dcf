"""What the docs (docs/configuration.md, docs/getting-started.md) say about the shipped scripts
and configs holds for the files themselves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "conf" / "ablation"


def test_ablation_script_and_config_table_list_every_variant():
    """scripts/ablation.sh runs every conf/ablation variant (converged is the reference row of
    docs/ablations.md) and the config table of docs/configuration.md names each."""
    variants = {p.stem for p in ABLATIONS.glob("*.yaml")}
    assert "converged" in variants and "ani2x_only" in variants
    script = (ROOT / "scripts" / "ablation.sh").read_text()
    (default,) = re.findall(r'variants="\$\{1:-([^}]*)\}"', script)
    assert sorted(default.split(",")) == sorted(variants)
    page = (ROOT / "docs" / "configuration.md").read_text()
    (row,) = [line for line in page.splitlines() if line.startswith("| `ablation` |")]
    assert set(re.findall(r"`(\w+)`", row.split("|")[2])) == variants


def test_ekd_script_runs_the_recipe_the_readme_and_configs_name():
    """scripts/ekd.sh's command is the one docs/getting-started.md's quick start quotes, and it composes to
    the measured recipe: the four ANI teachers plus two ViSNets, every model capped at 30 epochs but
    the baselines, which run to convergence (cap 200) as the report's yardstick."""
    from ekd_lightning.workflow.compose import compose_train

    script = (ROOT / "scripts" / "ekd.sh").read_text()
    (command,) = re.findall(r"^python train\.py (.*) \"\$@\"$", script, flags=re.M)
    page = " ".join((ROOT / "docs" / "getting-started.md").read_text().split())
    assert f"`scripts/ekd.sh` runs `python train.py {command}`" in page
    cfg = compose_train(command.split())
    assert list(cfg.pipeline.teachers.models) == ["ani2x"] * 3 + ["ani1x"] + ["visnet_small"] * 2
    assert cfg.pipeline.max_epochs == 30 and cfg.pipeline.teachers.max_epochs == 30
    assert cfg.pipeline.baseline_max_epochs == 200
    assert cfg.run_name == "ekd"
