"""One writer per output: a lease file ``TARGET.lock`` beside what a run writes (docs/store.md, "One writer").

Two runs that write one output at once mix their results: two ``embed`` runs into one store, two
``train``/``pretrain`` runs into one ``--out`` folder (each writes ``metrics.csv``, checkpoints and the
model; the second resumes from the first's checkpoints while the first is still writing them), two
``simulate`` runs into one survey root (bricks of one seed under the other's manifest), two partitioned
joins into one folder (each removes the other's files). So every command that writes such a folder first
takes that output's lease here: the store (``embed``, ``classify``, ``fewshot``, ``morphology``,
``verify --repair``), the model folder (``train``, ``pretrain``), the simulated survey root
(``simulate``), the partitioned join's folder (``join --out FOLDER``), ``restore``'s and ``evaluate``'s.

The lease names its holder: host, pid, the process's start time (so a recycled pid is not taken
for the holder), when the lease was taken, the command line, and a random token. Its **heartbeat**
is the file's modification time, touched every :data:`HEARTBEAT_S` seconds by a daemon thread of
the holder. The file is created with ``link(2)`` of a complete temporary file (atomic, exclusive,
also on NFS) and never rewritten, so a reader sees a whole lease or none.

The lease is **stale** (and is taken over, with a warning) when

- the holder ran on this host and its process is gone (no such pid, or a pid with another start
  time), or
- the holder ran on another host and its heartbeat is older than :data:`STALE_S` seconds.

Otherwise a second writer refuses with one line naming the holder and how to take over
(``--force-unlock``, for a holder you know is gone, e.g. a node that died less than STALE_S ago).
Taking over renames the old lease aside first and checks that the renamed lease is the one judged
stale, so two processes breaking the same stale lease cannot both win. The holder re-reads the
lease before every commit (:meth:`WriterLock.check`): a lease taken over under a live writer stops
that writer before it writes again.

Readers take no lock. A process may take the lock of one output several times (nested writers in one
process share it; it is released when the outermost holder releases it).
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from galaxalign_batch.errors import GalaxAlignError

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".lock"
#: seconds between two heartbeats of the holder
HEARTBEAT_S = float(os.environ.get("GALAXALIGN_LOCK_HEARTBEAT_S", "10"))
#: a lease of another host whose heartbeat is older than this is stale
STALE_S = float(os.environ.get("GALAXALIGN_LOCK_STALE_S", "60"))


class LockError(GalaxAlignError):
    """The output is being written by another process (or this process lost its lease)."""


def lock_path(target: str | os.PathLike) -> str:
    """``<resolved path>.lock``: one lease per output (a store, a training folder), whatever spelling or
    symlink names it."""
    return os.path.realpath(os.path.normpath(os.fspath(target))) + LOCK_SUFFIX


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def _proc_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process. A zombie (killed, not yet reaped by its parent: e.g. a run
    SIGKILLed by ``timeout -s KILL``, which is killed with it, until init reaps the orphan) writes nothing
    more and counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    fields = _proc_stat(pid)
    return not fields or fields[0] not in ("Z", "X")


def _describe_time(ts: float) -> str:
    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def busy_message(target: str | os.PathLike, lease: "Lease") -> str:
    """The one line a second writer gets: who holds ``target`` and what to do."""
    return (f"{os.fspath(target)} is being written by another run: {lease.describe()}; wait for it to finish, "
            f"write elsewhere, or if that run is gone, re-run with --force-unlock")


class Lease(dict):
    """The content of a lease file plus its heartbeat (the file's mtime)."""

    heartbeat: float = 0.0

    def describe(self) -> str:
        age = max(0.0, time.time() - self.heartbeat)
        cmd = " ".join(str(self.get("command", "?")).split())
        if len(cmd) > 120:
            cmd = cmd[:117] + "..."
        return (f"host {self.get('host')} pid {self.get('pid')} (started {self.get('started')}, last heartbeat "
                f"{age:.0f} s ago, command: {cmd})")

    def stale_reason(self) -> str | None:
        """Why the lease's holder is gone, or None when it may still be writing."""
        if self.get("damaged"):
            return "the lease file is damaged"
        if self.get("host") == socket.gethostname() and self.get("boot_id") == _boot_id():
            pid = int(self.get("pid", -1))
            if pid <= 0 or not pid_alive(pid):
                return "its process is gone"
            start = _proc_start(pid)
            if start is not None and self.get("pid_start") not in (None, start):
                return "its pid now belongs to another process"
            return None
        if self.get("host") == socket.gethostname() and self.get("boot_id") != _boot_id():
            return "its host was rebooted"
        age = time.time() - self.heartbeat
        if age > STALE_S:
            return f"no heartbeat for {age:.0f} s (stale after {STALE_S:.0f} s)"
        return None


def read_lease(path: str) -> Lease | None:
    """The lease at ``path`` (None when there is none). A damaged lease file reads as a stale lease."""
    try:
        st = os.stat(path)
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
    except ValueError:
        data = {"host": "?", "pid": -1, "token": f"damaged-{st.st_ino}-{st.st_size}", "command": "(damaged lease)",
                "damaged": True}
    lease = Lease(data)
    lease.heartbeat = st.st_mtime
    return lease


def lock_status(target: str | os.PathLike) -> Lease | None:
    """The current lease of ``target`` (for ``verify``), or None."""
    return read_lease(lock_path(target))


_held: dict[str, "WriterLock"] = {}
_held_lock = threading.Lock()


class WriterLock:
    """The writer's lease of one output. Use :func:`acquire` (re-entrant within a process)."""

    def __init__(self, target: str | os.PathLike):
        self.target = os.fspath(target)
        self.path = lock_path(target)
        self.token = uuid.uuid4().hex
        self.count = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: str | None = None

    # ---- taking and giving back ------------------------------------------------------------------------------
    def _content(self) -> dict[str, Any]:
        return {"format": "galaxalign-lease", "host": socket.gethostname(), "pid": os.getpid(),
                "pid_start": _proc_start(os.getpid()), "boot_id": _boot_id(),
                "started": _describe_time(time.time()), "command": " ".join(sys.argv) or "python",
                "token": self.token}

    def _try_create(self) -> bool:
        tmp = f"{self.path}.{self.token}.new"
        with open(tmp, "w") as f:
            json.dump(self._content(), f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _break(self, lease: Lease) -> None:
        """Remove the lease judged stale (or forced), unless someone replaced it meanwhile."""
        aside = f"{self.path}.{self.token}.broken"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # someone else broke it first
        taken = read_lease(aside)
        if taken is not None and taken.get("token") != lease.get("token"):
            # Not the lease we judged: a new holder took over between our read and our rename. Put it back.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                log.warning("%s: a lease taken over concurrently was displaced; its holder will stop at its "
                            "next commit", self.path)
        os.unlink(aside)

    def acquire(self, force: bool = False) -> "WriterLock":
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        for _ in range(20):
            if self._try_create():
                break
            lease = read_lease(self.path)
            if lease is None:
                continue
            reason = lease.stale_reason()
            if reason is None and not force:
                raise LockError(busy_message(self.target, lease))
            if reason is None:
                log.warning("%s: --force-unlock: taking the lock of %s", self.target, lease.describe())
            else:
                log.warning("%s: taking over a stale lock (%s): %s", self.target, reason, lease.describe())
            self._break(lease)
        else:
            raise LockError(f"{self.target}: could not take the lock {self.path} (it keeps changing hands)")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            lease = read_lease(self.path)
            if lease is None or lease.get("token") != self.token:
                self.lost = "the lease was taken over by " + (lease.describe() if lease else "nobody (removed)")
                return
            try:
                os.utime(self.path)
            except OSError as e:
                log.warning("%s: heartbeat failed (%s)", self.path, e)

    def check(self) -> None:
        """Raise :class:`LockError` unless this process still holds the lease (called before each commit)."""
        lease = read_lease(self.path)
        if lease is None or lease.get("token") != self.token:
            who = lease.describe() if lease else "nobody (the lock file was removed)"
            raise LockError(f"{self.target}: this run lost its lock (now held by {who}); stopping before the next "
                            "write. Another run may be writing it (a store: check it with 'galaxalign-batch verify')")

    def release(self) -> None:
        self._stop.set()
        lease = read_lease(self.path)
        if lease is not None and lease.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def acquire(target: str | os.PathLike, force: bool = False) -> WriterLock:
    """Take the writer's lease of ``target`` (re-entrant in one process); :class:`LockError` if another holds it."""
    key = lock_path(target)
    with _held_lock:
        lock = _held.get(key)
        if lock is None:
            lock = WriterLock(target).acquire(force=force)
            _held[key] = lock
        lock.count += 1
        return lock


def release(lock: WriterLock) -> None:
    """Give back one :func:`acquire`; the lease file goes when the last holder in this process releases it."""
    with _held_lock:
        lock.count -= 1
        if lock.count > 0:
            return
        _held.pop(lock.path, None)
    lock.release()


def held(target: str | os.PathLike) -> WriterLock | None:
    """This process's lease of ``target``, if it holds one."""
    with _held_lock:
        return _held.get(lock_path(target))


def check_writable(target: str | os.PathLike) -> None:
    """Refuse to write ``target`` when another live process holds its lease (or this one lost it).

    Writers that took the lock are checked against their own lease; a writer that did not (library
    use) may write only while nobody else holds a live lease.
    """
    mine = held(target)
    if mine is not None:
        mine.check()
        return
    lease = read_lease(lock_path(target))
    if lease is not None and lease.stale_reason() is None:
        raise LockError(busy_message(target, lease))


def check_held(target: str | os.PathLike) -> None:
    """Raise :class:`LockError` if this process took ``target``'s lease and has lost it since; nothing when it
    holds none (a Ray Train worker writes for the driver, which holds the lease)."""
    mine = held(target)
    if mine is not None:
        mine.check()


@atexit.register
def _release_all() -> None:
    """A process that exits normally leaves no lease behind (a killed one leaves a stale one)."""
    with _held_lock:
        locks = list(_held.values())
        _held.clear()
    for lock in locks:
        lock.release()


class locked:
    """``with locked(target, force):`` holds ``target``'s lease for the block."""

    def __init__(self, target: str | os.PathLike, force: bool = False):
        self.target, self.force = target, force
        self.lock: WriterLock | None = None

    def __enter__(self) -> WriterLock:
        self.lock = acquire(self.target, self.force)
        return self.lock

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            release(self.lock)
