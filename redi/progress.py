"""Progress bars: a live tqdm bar on a terminal, a plain line every INTERVAL_S seconds in a log file.

A bar redrawn with carriage returns in a log grows with every update (tens of KB per thousand
steps); when stderr is not a terminal each redraw becomes one whole line, at most every INTERVAL_S.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

INTERVAL_S = 30.0


class _Lines:
    """A stream for tqdm that writes each redraw as one line, and not the same line twice."""

    def __init__(self, stream: TextIO):
        self.stream, self.last = stream, None
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text and text != self.last:
            self.stream.write(text + "\n")
            self.last = text

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: live on a terminal, else plain periodic lines (kwargs go to tqdm)."""
    stream = sys.stderr
    if stream.isatty():
        return tqdm(iterable, file=stream, **kwargs)
    return tqdm(iterable, file=_Lines(stream), mininterval=INTERVAL_S, ncols=100, ascii=True, **kwargs)
