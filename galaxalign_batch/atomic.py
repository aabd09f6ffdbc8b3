"""Whole-file replaces: the one way the project writes a file that someone else may read.

Every output file (tables, catalogues, indexes, reports, pictures, weights, simulated tiles, the
store's own files) is written to a temporary file beside it and renamed over it (POSIX ``rename`` is
atomic), so a reader, or a process killed at any moment, sees the old file or the new one, never a
part of either:

>>> with replacing("out/table.parquet") as tmp:   # doctest: +SKIP
...     pyarrow.parquet.write_table(table, tmp)

- The temporary name is unique to the writer (``.table.parquet.<12 hex>.partial.parquet``), so two
  processes writing the same file at once each produce a whole file and the last rename wins; with a
  shared name (``out.partial``) the two would write into one file and the first rename would publish it
  half-written. It keeps the target's extension, for libraries that choose the format by it (astropy,
  matplotlib, NumPy's ``savez``), and starts with a dot, so that globs such as ``*.fits.fz`` never see it.
- On an exception the temporary file is removed and the target is left as it was. A process killed
  between the two leaves the temporary file behind (``*.partial*``; :func:`partials` finds them).
- ``durable=True`` fsyncs the file before the rename, so that after a power failure the name points at
  whole contents; making the rename itself durable is :func:`fsync_dir` of the folder, which the caller
  does when it needs it (the store does it once per commit for every folder it wrote in). Off by default:
  outputs a re-run can make again do not need it.
- ``exclusive=True`` creates the file only if it does not exist (a hard link instead of a rename;
  :class:`FileExistsError` otherwise).

Renames of whole folders (training checkpoints, the store's groups) are their owners' own protocols.
"""

from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["PARTIAL", "replacing", "temporary_name", "write_bytes", "write_text", "write_json", "is_partial",
           "partials", "remove_partials", "fsync_dir"]

PARTIAL = ".partial"


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename inside it durable); ignored where directories cannot be opened."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_name(path: str | os.PathLike, *, hidden: bool = True, keep_suffix: bool = True) -> Path:
    """The temporary file a writer of ``path`` writes first: unique to the call, in the same folder."""
    path = Path(path)
    suffix = path.suffix if keep_suffix else ""
    name = f"{'.' if hidden else ''}{path.name}.{uuid.uuid4().hex[:12]}{PARTIAL}{suffix}"
    return path.with_name(name)


@contextmanager
def replacing(path: str | os.PathLike, *, durable: bool = False, exclusive: bool = False, hidden: bool = True,
              keep_suffix: bool = True) -> Iterator[str]:
    """Yield a temporary path to write the new ``path`` to; on a clean exit it replaces ``path`` in one rename.

    Creates ``path``'s folder. On an exception the temporary file is removed and ``path`` is untouched.
    ``hidden`` / ``keep_suffix`` shape the temporary name (the store keeps its names visible and bare).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path, hidden=hidden, keep_suffix=keep_suffix)
    done = False
    try:
        yield str(tmp)
        try:
            if durable:
                _fsync_file(str(tmp))
            if exclusive:
                os.link(tmp, path)  # FileExistsError if path exists
                os.unlink(tmp)
            else:
                os.replace(tmp, path)
        except FileNotFoundError as e:
            if e.filename == str(tmp) or not os.path.exists(tmp):
                raise FileNotFoundError(f"{tmp}: the writer of {path} wrote nothing") from None
            raise
        done = True
    finally:
        if not done:
            try:
                os.unlink(tmp)
            except OSError:  # never made
                pass


def write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, durable: bool = False,
                exclusive: bool = False, hidden: bool = True, keep_suffix: bool = True) -> None:
    """Replace (or, with ``exclusive``, create) the file ``path`` with ``data`` in one rename."""
    with replacing(path, exclusive=exclusive, hidden=hidden, keep_suffix=keep_suffix) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:  # here rather than through replacing(durable=True): saves an open per write (the store's chunks)
                f.flush()
                os.fsync(f.fileno())


def write_text(path: str | os.PathLike, text: str, *, durable: bool = False) -> None:
    """Replace the file ``path`` with ``text`` (UTF-8) in one rename."""
    write_bytes(path, text.encode("utf-8"), durable=durable)


def write_json(path: str | os.PathLike, value: Any, *, durable: bool = False, indent: int | None = 1,
               **dump_options: Any) -> None:
    """Replace the file ``path`` with ``value`` as JSON in one rename (``dump_options`` go to :func:`json.dumps`)."""
    write_text(path, json.dumps(value, indent=indent, **dump_options) + "\n", durable=durable)


def is_partial(name: str) -> bool:
    """Whether the file name is a temporary file of :func:`replacing` (a killed writer's leftover)."""
    return name.endswith(PARTIAL) or os.path.splitext(name)[0].endswith(PARTIAL)


def partials(folder: str | os.PathLike) -> list[Path]:
    """The temporary files of :func:`replacing` directly in ``folder`` (hidden ones included), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(folder / n for n in os.listdir(folder) if is_partial(n) and (folder / n).is_file())


def remove_partials(folder: str | os.PathLike, *, recursive: bool = False) -> int:
    """Remove the temporary files killed writers left in ``folder`` (and below it, with ``recursive``); returns
    how many. Only for a folder whose writers are known to be gone (a store under its lock, a job's own folder)."""
    n = 0
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            if is_partial(f):
                try:
                    os.unlink(os.path.join(dirpath, f))
                    n += 1
                except OSError:
                    pass
        if not recursive:
            break
    return n
