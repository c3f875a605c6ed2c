"""Resumable HDF5 outputs: rows are written under `<name>.partial`, renamed when all are done."""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ReDiError, WriteFailure
from .io import fsync_path, sha256_file


class ResumableH5:
    """A fixed-size table of per-sample arrays, filled in any order, safe to kill and restart.

    Every dataset has `num_rows` rows; a boolean `done` dataset records the rows written. A rerun
    opens the same `.partial` file and only the rows not done remain in `todo`. `attrs` are the
    settings the rows depend on: a partial file made with other settings is refused, not mixed.
    `code` is the writing stage's code version (redi.code_version): a partial file written by
    other code is removed and started afresh, with a line saying so.

    A new file takes all its space when it is created (early allocation, chunks written with the
    fill value), after checking the disk has room: row writes then overwrite space the file owns,
    so a full disk stops the stage before it starts rather than in the middle of an HDF5 write.
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
            try:
                self.file = h5py.File(self.partial, "a")
            except OSError as err:
                raise ReDiError(f"{self.partial} cannot be opened to resume ({_reason(err)}); "
                                f"delete it to start over") from None
            self._check_same(num_rows, datasets, attrs)
        else:
            _check_room(self.partial, num_rows, datasets)
            with self._surfaced_errors():
                self.file = h5py.File(self.partial, "w")
                for name, (shape, dtype) in [*datasets.items(), ("done", ((), bool))]:
                    chunks = (min(chunk_rows, num_rows), *shape)
                    self.file.create_dataset(name, (num_rows, *shape), dtype=dtype, chunks=chunks,
                                             dcpl=_reserving_dcpl())
                self.file.attrs.update({k: _attr(v) for k, v in attrs.items()})
                self.file.flush()
        # held open, so HDF5 never closes a dataset (and writes its cached chunks) inside a
        # destructor, where h5py can only print the error as "Exception ignored"
        self.datasets = {name: self.file[name] for name in (*datasets, "done")}

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
        with self._surfaced_errors():  # the rows reach the file before they are marked done
            for name, values in arrays.items():
                self.datasets[name][where] = np.asarray(values)[order]
            self.file.flush()
        with self._surfaced_errors():
            self.datasets["done"][where] = True
            self.file.flush()

    def finish(self, **extra: np.ndarray) -> None:
        """Store `extra` whole-file datasets, close and rename into place; refuses if rows are missing."""
        missing = int(self.todo.sum())
        with self._surfaced_errors():
            for name, values in extra.items():
                if name in self.file:
                    del self.file[name]
                self.file.create_dataset(name, data=values)
            self.file.flush()
            self.datasets.clear()
            self.file.close()
        if missing:
            raise ReDiError(f"{self.partial}: {missing} rows were not written; rerun the stage")
        try:
            fsync_path(self.partial)  # on disk before the rename makes it look complete
        except OSError as err:
            raise ReDiError(f"could not write {self.partial}: {_reason(err)}; free space (or fix the "
                            f"folder) and rerun: the stage resumes from it") from None
        os.replace(self.partial, self.path)
        fsync_path(self.path.parent)

    def close(self) -> None:
        self.datasets.clear()
        self.file.close()

    @contextmanager
    def _surfaced_errors(self) -> Iterator[None]:
        """Raise the write errors of the block (a full disk, a read-only folder) as a WriteFailure.

        h5py raises some of them and only prints others (from destructors) as ignored exceptions;
        those are collected through sys.unraisablehook. The failed file stays under its `.partial`
        name, with the rows marked done flushed before, so a rerun resumes it.
        """
        caught: list[BaseException] = []
        previous = sys.unraisablehook

        def collect(unraisable):
            if isinstance(unraisable.exc_value, (OSError, RuntimeError)):
                caught.append(unraisable.exc_value)
            else:
                previous(unraisable)

        sys.unraisablehook = collect
        try:
            try:
                yield
            except (OSError, RuntimeError) as err:
                caught.insert(0, err)
        finally:
            sys.unraisablehook = previous
        if caught:
            # HDF5 crashes the process when it closes a file after a failed write, and h5py closes
            # a file (or a dataset) when its last reference goes: keep every one alive until the
            # CLI exits without that cleanup (see WriteFailure)
            _FAILED.append((self.__dict__.copy(), caught))
            raise WriteFailure(f"could not write {self.partial}: {_reason(caught[0])}; free space (or fix "
                               f"the folder) and rerun: the stage resumes from the rows marked done")


# HDF5 objects (and the errors that reference them) of files whose writes failed, never released.
_FAILED: list = []


# Room kept free beyond the datasets' bytes for HDF5's own metadata (object headers, chunk index).
METADATA_ROOM = 1 << 20


def _check_room(partial: Path, num_rows: int, datasets: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Refuse, before creating anything, a file that the disk has no room for."""
    need = num_rows * (1 + sum(math.prod(shape) * np.dtype(dtype).itemsize
                               for shape, dtype in datasets.values())) + METADATA_ROOM
    free = shutil.disk_usage(partial.parent).free
    if need > free:
        raise ReDiError(f"{partial.name} needs {_size(need)} but {partial.parent} has {_size(free)} free; "
                        f"free space (or point the output elsewhere) and rerun")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _reserving_dcpl() -> h5py.h5p.PropDCID:
    """Dataset creation properties that allocate and write every chunk when the dataset is made."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    return dcpl


def _reason(err: BaseException) -> str:
    """The OS's words for an HDF5 write error (h5py's messages span lines and name internals)."""
    found = re.search(r"error message = '([^']*)'", str(err))
    if found:
        return found[1]
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _attr(value: Any) -> Any:
    return "" if value is None else value


def provenance(shard_manifest: str | os.PathLike, encoder: Any) -> dict[str, str]:
    """Attributes naming what a stage's rows are made from: the shards and the encoder's weights."""
    return {"shards": sha256_file(shard_manifest),
            "encoder": getattr(encoder, "weights_id", "unregistered")}  # set by load_encoder
