"""The documentation: result tables rendered from JSON, a short README, a site that builds in
strict mode (broken links and anchors fail) without the internet."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULT_PAGES = ("results.md", "ablations.md", "md-stability-results.md")


def load_render():
    spec = importlib.util.spec_from_file_location("docs_render", DOCS / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_rendered_block_equals_its_rendering_now():
    """Mutation caught: a figure changed by hand in a page (or in the README's headline table),
    or in a JSON source without rerunning ``python docs/render.py``."""
    render = load_render()
    counts = {page.name: len(render.blocks(page.read_text())) for page in render.pages()}
    assert counts["README.md"] == 1 and counts["index.md"] == 1, counts
    assert counts["results.md"] >= 5 and counts["ablations.md"] >= 4, counts
    assert render.stale() == []
    done = subprocess.run([sys.executable, str(DOCS / "render.py"), "--check"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout


def test_check_names_a_block_edited_by_hand(tmp_path, monkeypatch):
    """``--check`` is not vacuous: one figure changed in a copy of results.md is reported."""
    render = load_render()
    page = tmp_path / "results.md"
    text = (DOCS / "results.md").read_text()
    assert "| 5.90 ± 0.41 |" in text
    page.write_text(text.replace("| 5.90 ± 0.41 |", "| 5.80 ± 0.41 |", 1))
    monkeypatch.setattr(render, "pages", lambda: [page])
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert render.stale() == ["results.md: results/tables/converged.json"]


def test_no_result_table_typed_by_hand():
    """Every Markdown table of the result pages and the README lies inside a rendered block.
    Mutation caught: a table pasted into a page outside the markers."""
    render = load_render()
    for page in [ROOT / "README.md", *(DOCS / name for name in RESULT_PAGES)]:
        outside = render.BLOCK.sub("", page.read_text())
        tables = [line for line in outside.splitlines() if line.lstrip().startswith("|")]
        assert tables == [], (page.name, tables[:2])


def test_json_sources_name_where_their_figures_come_from():
    """Each JSON holding figures names the command (or the issue's measurement) behind them;
    those typed once from the README name its commit too. Mutation caught: a source dropped."""
    for path in sorted((DOCS / "results").rglob("*.json")):
        if path.parent.name == "tables" and '"kind": "literal"' not in path.read_text():
            continue  # a table spec: which rows and columns, no figures
        source = json.loads(path.read_text()).get("source") or {}
        assert source.get("command") or source.get("issue"), path  # what produced the figures


def test_renderer_reads_the_report_the_pipeline_writes(tmp_path):
    """``python docs/render.py report summary.json`` on a report written by the pipeline's own
    ``write_report``: each role's figures (mean ± std over seeds) and epochs land in its row.
    Mutation caught: a renderer reading keys the pipeline does not write."""
    from ekd_lightning.analysis.evaluate import ALL
    from ekd_lightning.workflow.pipeline import RunSpec, write_report

    cfg = OmegaConf.create({"run_name": "fresh", "pipeline": {"seeds": [0, 1], "heldout_split": "test",
                                                            "max_epochs": 9}})
    runs = [RunSpec("teacher", "teacher", "ani2x", 100, 9, index=0),
            RunSpec("teacher", "teacher", "ani2x", 101, 9, index=1),
            *(RunSpec(role, role, "ani2x", seed, 9) for role in ("baseline", "student")
              for seed in (0, 1)), RunSpec("oracle", "oracle", "ani2x", 0, 9)]
    force = {"teacher0": 6.0, "teacher1": 6.4, "ensemble": 5.8, "baseline-seed0": 7.0,
             "baseline-seed1": 7.2, "student-seed0": 5.5, "student-seed1": 5.7, "oracle-seed0": 2.0}
    rows = [{"model": name, "subset": ALL, "energy_mae": f / 5, "de_mae": f / 3, "force_mae": f,
             "force_rmse": 1.3 * f} for name, f in force.items()]
    training = {run.name: {"epochs": 9, "best_epoch": 4 + i % 3, "stopped_early": i % 2 == 0,
                           "max_epochs": 9, "train_time_s": 1.0, "best_val_loss": 1.0 + i,
                           "history": []} for i, run in enumerate(runs)}
    out = tmp_path / "report"
    write_report(cfg, {"heldout": rows, "test": rows}, [], {}, out, runs, training)
    text = subprocess.run([sys.executable, str(DOCS / "render.py"), "report",
                           str(out / "summary.json")], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    lines = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines()}
    assert "| 9 (6), 9 (4) cap | 7.10 ± 0.10 | 1.42 ± 0.02 | 7.10 ± 0.10 | 2.37 ± 0.03 |" in \
        lines["energy-only baseline, 2 seeds"]
    assert "| 9 (5), 9 (6) cap | **5.60 ± 0.10** |" in lines["EKD student, 2 seeds"]
    assert "| 9 (4) | 6.00 |" in lines["best single teacher (teacher0, lowest val loss)"]
    assert "| 9-9 | 5.80 |" in lines["teacher ensemble"]
    assert "| 9 (4) | 2.00 ± 0.00 |" in lines["oracle (true forces)"]


def test_readme_is_short():
    """Issue 25: a README a newcomer reads in two minutes."""
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` with every proxy pointing at a closed port, so a build that
    fetched anything (fonts, social cards) would fail."""
    dead = "http://127.0.0.1:9"
    env = {**os.environ, "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "http_proxy": dead,
           "https_proxy": dead, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config),
                           "-d", str(site)], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_site_builds_in_strict_mode_offline(tmp_path):
    """Mutation caught: a broken link or anchor in any page, a page missing from the nav."""
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "results" / "index.html").is_file()


@pytest.mark.slow
def test_strict_build_fails_on_a_broken_anchor(tmp_path):
    """The check above can fail: a copy of the site with one link to a missing anchor."""
    shutil.copytree(DOCS, tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text() + "\nSee [nowhere](results.md#no-such-section).\n")
    done = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and re.search(r"no-such-section", done.stderr), done.stderr[-2000:]
