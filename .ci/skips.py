"""Skipped tests in a pytest JUnit XML report: ``python .ci/skips.py report.xml``.

Prints how many tests were skipped and why, and exits 1 if any was skipped for a reason other
than :data:`ALLOWED`: CI has every extra installed and ``../shared`` beside the clone, so only
tests that need a CUDA GPU may skip there.
"""

import sys
import xml.etree.ElementTree as ET
from collections import Counter

ALLOWED = "needs a CUDA GPU (none visible)"


def skipped(path: str) -> list[tuple[str, str]]:
    """(test id, skip reason) of every skipped test (expected failures are not skips)."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        for skip in case.findall("skipped"):
            if skip.get("type") != "pytest.xfail":
                out.append((f"{case.get('classname')}::{case.get('name')}", skip.get("message", "")))
    return out


def main(argv: list[str]) -> int:
    try:
        skips = skipped(argv[1])
    except (OSError, ET.ParseError, IndexError) as error:
        print(f"skipped tests: unknown (no readable JUnit report: {error})")
        return 1
    bad = [(test, reason) for test, reason in skips if reason != ALLOWED]
    for reason, count in sorted(Counter(reason for _, reason in skips).items()):
        print(f"  {count} skipped: {reason}")
    for test, reason in bad:
        print(f"  not allowed in CI: {test}: {reason}")
    print(f"skipped tests: {len(skips)} ({len(skips) - len(bad)} allowed: '{ALLOWED}')")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
