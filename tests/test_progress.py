"""redi.progress: plain periodic lines in a log, a live bar on a terminal."""

import io
import sys

from redi import progress as progress_module
from redi.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_few_whole_lines_not_a_redraw_per_update(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    for _ in progress(range(5000), desc="train", unit="step"):
        pass
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) <= 3  # the first line, the last, at most one more at INTERVAL_S
    assert lines[-1].startswith("train: 100%") and "5000/5000" in lines[-1]
    assert len(text) < 400


def test_lines_are_periodic(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(progress_module, "INTERVAL_S", 0.0)
    with progress(total=4, desc="sample", miniters=1) as bar:
        for _ in range(4):
            bar.update(1)
    counts = [line.split("|")[-1].split()[0] for line in log.getvalue().splitlines()]
    assert counts[:5] == ["0/4", "1/4", "2/4", "3/4", "4/4"] and set(counts[4:]) == {"4/4"}  # + closing line


def test_a_terminal_gets_a_live_bar(monkeypatch):
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    for _ in progress(range(3), desc="train", mininterval=0, miniters=1):
        pass
    assert "\r" in terminal.getvalue()  # redrawn in place
