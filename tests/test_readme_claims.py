"""What the README says about the shipped scripts and configs holds for the files themselves."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABLATIONS = ROOT / "src" / "ekd_lightning" / "conf" / "ablation"


def test_ablation_script_and_config_table_list_every_variant():
    """scripts/ablation.sh runs every conf/ablation variant (converged is the README's reference
    row) and the README's config table names each."""
    variants = {p.stem for p in ABLATIONS.glob("*.yaml")}
    assert "converged" in variants and "ani2x_only" in variants
    script = (ROOT / "scripts" / "ablation.sh").read_text()
    (default,) = re.findall(r'variants="\$\{1:-([^}]*)\}"', script)
    assert sorted(default.split(",")) == sorted(variants)
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `ablation` |")]
    assert set(re.findall(r"`(\w+)`", row.split("|")[2])) == variants
