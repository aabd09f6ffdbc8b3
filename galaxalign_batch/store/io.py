"""The store's one write path: every file the store writes goes through :class:`WriteStore`.

- Every write is a **whole-file replace**: the bytes go to ``<name>.<random>.partial`` in the same
  folder, are flushed and fsync'ed, and the temporary file is renamed over ``<name>`` (POSIX
  ``rename`` is atomic). A reader, or a process killed at any moment, sees the old file or the new
  one, never a mix; a killed write leaves at most a ``*.partial`` file, which nobody reads and the
  next writer removes (:func:`remove_partials`).
- The folders that received a renamed file are remembered and fsync'ed by :meth:`WriteStore.sync`
  before the commit record is written, so a power failure cannot persist the commit record
  without the data it points to.
- :func:`before_write` is called before each write (``set``, ``delete``, a rename of the store's own
  folders). It does nothing; tests replace it to stop the writer after its k-th write, for every k
  (``tests/test_exactly_once.py``).

This does not depend on zarr's own LocalStore being atomic (zarr 3.0 wrote in place).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from zarr.storage import LocalStore

from galaxalign_batch import atomic

PARTIAL_SUFFIX = atomic.PARTIAL


def before_write(store: "WriteStore | None", key: str) -> None:
    """Called before every write of the store (``key`` names it); a no-op, replaced by fault-injection tests."""


def _hook(store: "WriteStore | None", key: str) -> None:
    # Looked up at call time, so that monkeypatching ``io.before_write`` takes effect everywhere.
    import galaxalign_batch.store.io as io_mod

    io_mod.before_write(store, key)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview, *, durable: bool = True,
                       exclusive: bool = False) -> None:
    """Replace (or, with ``exclusive``, create) the store file ``path`` with ``data`` in one rename
    (:func:`galaxalign_batch.atomic.write_bytes`; the temporary name is visible and ends with ``.partial``,
    which :func:`remove_partials` removes)."""
    atomic.write_bytes(path, data, durable=durable, exclusive=exclusive, hidden=False, keep_suffix=False)


class WriteStore(LocalStore):
    """A zarr LocalStore whose writes are whole-file replaces through :func:`before_write`."""

    def __init__(self, root, *, read_only: bool = False, durable: bool = True) -> None:
        super().__init__(root, read_only=read_only)
        self.durable = durable
        self._dirty: set[Path] = set()

    def with_read_only(self, read_only: bool = False):
        return type(self)(self.root, read_only=read_only, durable=self.durable)

    def _put_file(self, key: str, data, exclusive: bool = False) -> None:
        path = self.root / key
        _hook(self, key)
        try:
            atomic_write_bytes(path, data, durable=self.durable, exclusive=exclusive)
        except FileExistsError:
            if not exclusive:
                raise
            return
        self._dirty.add(path.parent)

    async def _set(self, key: str, value, exclusive: bool = False) -> None:
        if not self._is_open:
            await self._open()
        self._check_writable()
        await asyncio.to_thread(self._put_file, key, value.as_buffer_like(), exclusive)

    def set_sync(self, key: str, value) -> None:
        self._ensure_open_sync()
        self._check_writable()
        self._put_file(key, value.as_buffer_like())

    def _remove(self, key: str) -> None:
        _hook(self, "delete " + key)
        path = self.root / key
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        self._dirty.add(path.parent)

    async def delete(self, key: str) -> None:
        self._check_writable()
        await asyncio.to_thread(self._remove, key)

    def delete_sync(self, key: str) -> None:
        self._ensure_open_sync()
        self._check_writable()
        self._remove(key)

    async def delete_dir(self, prefix: str) -> None:
        self._check_writable()
        path = self.root / prefix
        if path.is_dir():
            await asyncio.to_thread(self._remove, prefix)

    def sync(self) -> None:
        """fsync every folder that received a file since the last call (before a commit record is written)."""
        if not self.durable:
            self._dirty.clear()
            return
        dirty, self._dirty = self._dirty, set()
        for d in sorted(dirty):
            atomic.fsync_dir(d)


def remove_partials(root: str | os.PathLike) -> int:
    """Remove ``*.partial`` files a killed writer left under ``root``; returns how many (call under the lock)."""
    return atomic.remove_partials(root, recursive=True)
