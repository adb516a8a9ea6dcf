"""The pipeline's overall progress display: a rich bar on a terminal, plain lines elsewhere."""

import io
from concurrent.futures import Future

from rich.console import Console

from ekd_lightning import progress as progress_module
from ekd_lightning.workflow.progress import PipelineProgress


def finished(value) -> Future:
    future = Future()
    future.set_result(value)
    return future


def test_plain_lines_off_a_terminal(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    out = io.StringIO()
    with PipelineProgress(3, Console(file=out, force_terminal=False, width=300)) as progress:
        now[0] = 60.0
        progress.step("teachers")
        waiting = progress.track({"teacher0": finished("a"), "baseline-seed0": Future()})
        assert progress.wait(waiting[:1]) == ["a"]
    lines = out.getvalue().splitlines()
    assert lines == [
        "[ekd 0:01:00] step 1/6 teachers: runs 0/3 done (started), ETA ?",
        # one of three runs in 60 s: two more take 120 s
        "[ekd 0:01:00] step 1/6 teachers: runs 1/3 done (teacher0 finished), ETA 0:02:00",
    ]
    assert "\x1b" not in out.getvalue()  # no terminal codes in CI logs


def test_rich_bar_on_a_terminal():
    out = io.StringIO()
    with PipelineProgress(2, Console(file=out, force_terminal=True, width=120)) as progress:
        progress.step("students")
        progress.wait(progress.track({"student-seed0": finished(1), "student-seed1": finished(2)}))
        progress.step("evaluate")
    text = out.getvalue()
    assert "\x1b[" in text and "2/2" in text and "step 4/6 evaluate" in text
    assert "[ekd " not in text  # not the plain lines
