"""Issue 21 (13): the long commands report progress on stderr - a tqdm bar on a terminal, plain lines
(count, rate, estimate) otherwise, nothing with --quiet - and the evaluation/training job runner uses it."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest

from scanside.agent.service import progress as prog
from scanside.training.common import run_jobs


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _not_quiet(monkeypatch):
    monkeypatch.delenv("SCANSIDE_QUIET", raising=False)
    prog.set_quiet(False)
    yield
    prog._QUIET = None


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    assert list(prog.progress(range(8), desc="simulating exams", unit="exam", stream=out)) == list(range(8))
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines[0].startswith("simulating exams: ") and "0/8" in lines[0]
    assert "8/8" in lines[-1] and "100%" in lines[-1]
    assert len(lines) <= 6  # a line per quarter at most, not one per item


def test_unknown_total_and_context_manager():
    out = io.StringIO()
    with prog.progress(desc="training", unit="step", stream=out) as bar:
        for _ in range(5):
            bar.update(1)
    assert "5step" in out.getvalue().replace(" ", "") or "5 step" in out.getvalue()


def test_a_terminal_gets_a_tqdm_bar_with_an_estimate():
    out = Tty()
    for _ in prog.progress(range(3), desc="calibration ranges", unit="sample", stream=out):
        pass
    text = out.getvalue()
    assert "\r" in text and "3/3" in text and "calibration ranges" in text


def test_quiet_prints_nothing(capsys):
    prog.set_quiet(True)
    assert list(prog.progress(range(3), desc="x")) == [0, 1, 2]
    prog.note("downloading")
    assert capsys.readouterr().err == ""


def _square(x: int) -> int:
    return x * x


@pytest.mark.parametrize("jobs", [1, 2])
def test_run_jobs_reports_on_stderr_and_keeps_order(capsys, jobs):
    assert run_jobs(_square, list(range(6)), jobs, desc="simulating exams") == [0, 1, 4, 9, 16, 25]
    captured = capsys.readouterr()
    assert captured.out == "" and "simulating exams" in captured.err and "6/6" in captured.err


def test_scanside_quiet_flag_reaches_the_commands(tmp_path):
    code = ("import sys; from scanside.agent.cli import main; from scanside.agent.service import progress as p; "
            "main(['--quiet', 'schema', 'events']); print('QUIET', p.quiet(), file=sys.stderr)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "QUIET True" in out.stderr, out.stderr
