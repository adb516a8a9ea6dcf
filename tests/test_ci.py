"""CI's skip check (.ci/skips.py, called by .ci/run): only CUDA-only tests may skip."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = '''
import pytest

def test_runs():
    pass

@pytest.mark.skipif(True, reason="needs a CUDA GPU (none visible)")
def test_cuda():
    pass

def test_optional():
    pytest.importorskip("a_module_that_is_not_installed")
'''


def junit_report(tmp_path: Path, source: str) -> Path:
    (tmp_path / "test_sample.py").write_text(source)
    report = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    f"--junitxml={report}", "--rootdir", str(tmp_path), str(tmp_path)],
                   capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True,
                   env={**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    return report


def check(report: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "skips.py"), str(report)],
                          capture_output=True, text=True, timeout=60)


def test_skips_other_than_cuda_fail_ci(tmp_path):
    result = check(junit_report(tmp_path, TESTS))
    assert result.returncode == 1
    refused = [line for line in result.stdout.splitlines() if "not allowed" in line]
    assert len(refused) == 1 and "test_optional: could not import 'a_module_that_is" in refused[0]
    assert result.stdout.splitlines()[-1].startswith("skipped tests: 2 (1 allowed")


def test_cuda_skips_pass_ci(tmp_path):
    result = check(junit_report(tmp_path, TESTS.split("def test_optional")[0]))
    assert result.returncode == 0, result.stdout
    assert result.stdout.splitlines()[-1].startswith("skipped tests: 1 (1 allowed")
    assert check(tmp_path / "missing.xml").returncode == 1
