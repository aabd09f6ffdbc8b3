"""Moved to :mod:`galaxalign_batch.lease` (the same lease now also guards ``train``/``pretrain`` output
folders). This name is kept so that scripts written against it (``from galaxalign_batch.store.lock import
locked``, as docs/store.md showed before) keep working; importing it warns once (DeprecationWarning)."""

from __future__ import annotations

import warnings

from galaxalign_batch.lease import (  # noqa: F401  (re-exported)
    HEARTBEAT_S, LOCK_SUFFIX, STALE_S, Lease, LockError, WriterLock, acquire, check_held, check_writable, held,
    lock_path, lock_status, locked, read_lease, release,
)

StoreLock = WriterLock  # the old class name

warnings.warn("galaxalign_batch.store.lock moved to galaxalign_batch.lease", DeprecationWarning, stacklevel=2)
