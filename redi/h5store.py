"""Resumable HDF5 outputs: rows are written under `<name>.partial`, renamed when all are done."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ReDiError
from .io import sha256_file


class ResumableH5:
    """A fixed-size table of per-sample arrays, filled in any order, safe to kill and restart.

    Every dataset has `num_rows` rows; a boolean `done` dataset records the rows written. A rerun
    opens the same `.partial` file and only the rows not done remain in `todo`. `attrs` are the
    settings the rows depend on: a partial file made with other settings is refused, not mixed.
    `code` is the writing stage's code version (redi.code_version): a partial file written by
    other code is removed and started afresh, with a line saying so.
    """

    def __init__(
        self, path: str | os.PathLike, num_rows: int,
        datasets: dict[str, tuple[tuple[int, ...], str]], attrs: dict[str, Any],
        chunk_rows: int = 64, *, code: str,
    ):
        attrs = {**attrs, "code_version": code}
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            self._discard_other_code(code)
        if self.partial.exists():
            self.file = h5py.File(self.partial, "a")
            self._check_same(num_rows, datasets, attrs)
        else:
            self.file = h5py.File(self.partial, "w")
            for name, (shape, dtype) in datasets.items():
                chunks = (min(chunk_rows, num_rows), *shape)
                self.file.create_dataset(name, (num_rows, *shape), dtype=dtype, chunks=chunks)
            self.file.create_dataset("done", (num_rows,), dtype=bool)
            self.file.attrs.update({k: _attr(v) for k, v in attrs.items()})

    def _discard_other_code(self, code: str) -> None:
        with h5py.File(self.partial, "r") as f:
            old = f.attrs.get("code_version")
        if old != code:
            self.partial.unlink()
            print(f"{self.partial}: written by code {old or '(unrecorded)'}, this is {code}; "
                  f"removed, starting over", file=sys.stderr, flush=True)

    def _check_same(self, num_rows, datasets, attrs) -> None:
        expected = {n: ((num_rows, *s), np.dtype(d)) for n, (s, d) in datasets.items()}
        found = {n: (self.file[n].shape, self.file[n].dtype) for n in expected if n in self.file}
        same_attrs = all(
            k in self.file.attrs and np.array_equal(self.file.attrs[k], _attr(v))
            for k, v in attrs.items()
        )
        if found != expected or not same_attrs:
            self.file.close()
            raise ReDiError(
                f"{self.partial} was started with other settings; delete it to start over"
            )

    @property
    def todo(self) -> np.ndarray:
        """Boolean mask of the rows still to write."""
        return ~self.file["done"][:]

    def write(self, rows: np.ndarray, **arrays: np.ndarray) -> None:
        """Write `arrays[name][i]` to row `rows[i]` of each dataset, then mark the rows done."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return
        order = np.argsort(rows)
        rows = rows[order]
        if (np.diff(rows) == 0).any():
            raise ValueError("ResumableH5.write: the same row appears twice in one batch")
        contiguous = rows[-1] - rows[0] + 1 == len(rows)
        where = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        for name, values in arrays.items():
            self.file[name][where] = np.asarray(values)[order]
        self.file["done"][where] = True
        self.file.flush()

    def finish(self, **extra: np.ndarray) -> None:
        """Store `extra` whole-file datasets, close and rename into place; refuses if rows are missing."""
        missing = int(self.todo.sum())
        for name, values in extra.items():
            if name in self.file:
                del self.file[name]
            self.file.create_dataset(name, data=values)
        self.file.close()
        if missing:
            raise ReDiError(f"{self.partial}: {missing} rows were not written; rerun the stage")
        os.replace(self.partial, self.path)

    def close(self) -> None:
        self.file.close()


def _attr(value: Any) -> Any:
    return "" if value is None else value


def provenance(shard_manifest: str | os.PathLike, encoder: Any) -> dict[str, str]:
    """Attributes naming what a stage's rows are made from: the shards and the encoder's weights."""
    return {"shards": sha256_file(shard_manifest),
            "encoder": getattr(encoder, "weights_id", "unregistered")}  # set by load_encoder
