"""The durable label store of a labelling task: SQLite in WAL mode, every change committed and fsynced.

Tables (one database file per task):

- ``task``: the task's name, its classes (JSON list, in order) and the store it labels;
- ``events``: the history, append-only except for ``undone_by``. A ``label`` event gives an object a
  class or a mark (``not-sure``, ``artefact``); an ``undo`` event cancels one earlier label event
  (whose ``undone_by`` then names it). Nothing is ever deleted;
- ``labels``: the current state, one row per object: the newest label event of that object that was
  not undone ("the last label wins"). It is kept in the same transaction as the events, so it can
  always be rebuilt from them (:meth:`LabelDB.rebuild_current`);
- ``heads``: one record per head the background trainer fitted (version, labels used, validation).

All methods are thread-safe (one connection, one lock); a method returns only after its transaction
committed with ``synchronous=FULL``, so a label acknowledged to the browser survives a killed server
or a crash of the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass

from galaxalign_batch import atomic
from galaxalign_batch.errors import ConfigError

#: Marks a person can give instead of a class; they are kept but never exported or trained on.
MARKS = ("not-sure", "artefact")
KINDS = ("class",) + MARKS

SCHEMA = """
CREATE TABLE IF NOT EXISTS task (
    name TEXT PRIMARY KEY, classes TEXT NOT NULL, store TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, session TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('label', 'undo')),
    object_id TEXT NOT NULL, row INTEGER NOT NULL,
    kind TEXT CHECK (kind IN ('class', 'not-sure', 'artefact')), label TEXT,
    undoes INTEGER REFERENCES events(id), undone_by INTEGER REFERENCES events(id));
CREATE INDEX IF NOT EXISTS events_object ON events(object_id, id);
CREATE INDEX IF NOT EXISTS events_session ON events(session, id);
CREATE TABLE IF NOT EXISTS labels (
    object_id TEXT PRIMARY KEY, row INTEGER NOT NULL, kind TEXT NOT NULL, label TEXT,
    event_id INTEGER NOT NULL REFERENCES events(id), ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS heads (
    version INTEGER PRIMARY KEY, ts REAL NOT NULL, n_labels INTEGER NOT NULL, kind TEXT NOT NULL,
    path TEXT NOT NULL, validation TEXT);
"""


@dataclass(frozen=True)
class Label:
    """The current label of one object."""

    object_id: str
    row: int
    kind: str          # "class", "not-sure" or "artefact"
    label: str | None  # the class name when kind == "class"
    event_id: int
    ts: float

    def as_dict(self) -> dict:
        return {"object_id": self.object_id, "row": self.row, "kind": self.kind, "label": self.label,
                "event_id": self.event_id, "ts": self.ts}


def check_classes(classes: list[str]) -> list[str]:
    """Validate class names: non-empty, unique (case-insensitively), no comma, not a mark; returns them stripped."""
    out: list[str] = []
    for c in classes:
        name = str(c).strip()
        if not name:
            raise ConfigError("empty class name in --classes (e.g. 'ring,,other' or a trailing comma)")
        if "," in name or any(ord(ch) < 32 for ch in name):
            raise ConfigError(f"class name {name!r}: no commas or control characters")
        if len(name) > 64:
            raise ConfigError(f"class name {name[:20]!r}...: longer than 64 characters")
        if name.lower() in MARKS:
            raise ConfigError(f"class name {name!r} is reserved for the '{name.lower()}' button")
        if name.lower() in (o.lower() for o in out):
            raise ConfigError(f"duplicate class {name!r} in --classes")
        out.append(name)
    if len(out) < 2:
        raise ConfigError(f"a task needs at least two classes (got {out}); e.g. --classes ring,not-ring")
    return out


class LabelDB:
    """The SQLite database of one labelling task (see the module docstring)."""

    def __init__(self, path: str | os.PathLike, task: str, classes: list[str] | None, store: str):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise ConfigError(f"{self.path}: not a usable label database ({e})") from None
        self.task = task
        self.classes = self._open_task(task, classes, store)

    def _open_task(self, task: str, classes: list[str] | None, store: str) -> list[str]:
        with self._tx():
            row = self._conn.execute("SELECT name, classes FROM task").fetchone()
            if row is None:
                if not classes:
                    raise ConfigError(f"task {task!r} is new: give its classes with --classes A,B[,...]")
                self._conn.execute("INSERT INTO task VALUES (?, ?, ?, ?)",
                                   (task, json.dumps(list(classes)), os.path.abspath(store), time.time()))
                return list(classes)
            name, known = row[0], json.loads(row[1])
            if name != task:
                raise ConfigError(f"{self.path}: holds task {name!r}, not {task!r} (one database per task)")
            if classes and list(classes) != known:
                raise ConfigError(f"task {task!r} has classes {','.join(known)}; labels given for them would not "
                                  f"match {','.join(classes)} (leave out --classes, or start another --task)")
            return known

    @contextlib.contextmanager
    def _tx(self):
        """One write transaction under the lock: BEGIN IMMEDIATE ... COMMIT (fsynced), ROLLBACK on error."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # ---- writing -----------------------------------------------------------------------------------------
    def add_label(self, session: str, object_id: str, row: int, kind: str, label: str | None) -> Label:
        """Record a label (or a mark) of one object; committed when this returns."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        if (kind == "class") != (label is not None) or (label is not None and label not in self.classes):
            raise ValueError(f"bad label {label!r} for kind {kind!r}")
        now = time.time()
        with self._tx():
            cur = self._conn.execute(
                "INSERT INTO events (ts, session, action, object_id, row, kind, label) VALUES (?, ?, 'label', ?, ?, ?, ?)",
                (now, session, object_id, int(row), kind, label))
            eid = int(cur.lastrowid)
            self._conn.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                               (object_id, int(row), kind, label, eid, now))
        return Label(object_id, int(row), kind, label, eid, now)

    def undo_last(self, session: str) -> tuple[int, str, int, Label | None] | None:
        """Cancel this session's newest label event that is not undone yet.

        Returns ``(undone event id, object_id, row, the object's label now or None)``, or None when the
        session has nothing left to undo. The object's current label becomes its newest label event that
        is still in force (another tab's later label stays: the last label wins).
        """
        with self._tx():
            ev = self._conn.execute(
                "SELECT id, object_id, row FROM events WHERE session = ? AND action = 'label' AND undone_by IS NULL "
                "ORDER BY id DESC LIMIT 1", (session,)).fetchone()
            if ev is None:
                return None
            eid, object_id, row = ev
            cur = self._conn.execute(
                "INSERT INTO events (ts, session, action, object_id, row, undoes) VALUES (?, ?, 'undo', ?, ?, ?)",
                (time.time(), session, object_id, row, eid))
            self._conn.execute("UPDATE events SET undone_by = ? WHERE id = ?", (int(cur.lastrowid), eid))
            now = self._refresh_object(object_id)
        return int(eid), str(object_id), int(row), now

    def _refresh_object(self, object_id: str) -> Label | None:
        ev = self._conn.execute(
            "SELECT id, row, kind, label, ts FROM events WHERE object_id = ? AND action = 'label' AND undone_by IS NULL "
            "ORDER BY id DESC LIMIT 1", (object_id,)).fetchone()
        if ev is None:
            self._conn.execute("DELETE FROM labels WHERE object_id = ?", (object_id,))
            return None
        eid, row, kind, label, ts = ev
        self._conn.execute("INSERT OR REPLACE INTO labels VALUES (?, ?, ?, ?, ?, ?)",
                           (object_id, row, kind, label, eid, ts))
        return Label(object_id, int(row), kind, label, int(eid), float(ts))

    def rebuild_current(self) -> None:
        """Recompute the ``labels`` table from the history (a consistency check; normally not needed)."""
        with self._tx():
            self._conn.execute("DELETE FROM labels")
            self._conn.execute(
                "INSERT INTO labels SELECT e.object_id, e.row, e.kind, e.label, e.id, e.ts FROM events e "
                "WHERE e.id = (SELECT MAX(id) FROM events f WHERE f.object_id = e.object_id AND f.action = 'label' "
                "AND f.undone_by IS NULL)")

    def add_head(self, n_labels: int, kind: str, path: str, validation: dict | None) -> int:
        with self._tx():
            cur = self._conn.execute("INSERT INTO heads (ts, n_labels, kind, path, validation) VALUES (?, ?, ?, ?, ?)",
                                     (time.time(), n_labels, kind, path, json.dumps(validation)))
            return int(cur.lastrowid)

    # ---- reading -----------------------------------------------------------------------------------------
    def labels(self) -> list[Label]:
        """Every object's current label or mark, oldest first."""
        with self._lock:
            rows = self._conn.execute("SELECT object_id, row, kind, label, event_id, ts FROM labels "
                                      "ORDER BY event_id").fetchall()
        return [Label(o, int(r), k, lab, int(e), float(t)) for o, r, k, lab, e, t in rows]

    def label_of(self, object_id: str) -> Label | None:
        with self._lock:
            r = self._conn.execute("SELECT object_id, row, kind, label, event_id, ts FROM labels WHERE object_id = ?",
                                   (object_id,)).fetchone()
        return Label(r[0], int(r[1]), r[2], r[3], int(r[4]), float(r[5])) if r else None

    def recent(self, n: int = 25) -> list[Label]:
        with self._lock:
            rows = self._conn.execute("SELECT object_id, row, kind, label, event_id, ts FROM labels "
                                      "ORDER BY event_id DESC LIMIT ?", (int(n),)).fetchall()
        return [Label(o, int(r), k, lab, int(e), float(t)) for o, r, k, lab, e, t in rows]

    def counts(self) -> dict[str, int]:
        """Current labels per class and per mark (every class and mark present, zero when none)."""
        out = {c: 0 for c in self.classes} | {m: 0 for m in MARKS}
        with self._lock:
            for kind, label, n in self._conn.execute("SELECT kind, label, COUNT(*) FROM labels GROUP BY kind, label"):
                out[label if kind == "class" else kind] = int(n)
        return out

    def n_events(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    def history(self) -> list[dict]:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM events ORDER BY id")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def last_head(self) -> dict | None:
        with self._lock:
            r = self._conn.execute("SELECT version, ts, n_labels, kind, path, validation FROM heads "
                                   "ORDER BY version DESC LIMIT 1").fetchone()
        if r is None:
            return None
        return {"version": int(r[0]), "ts": float(r[1]), "n_labels": int(r[2]), "kind": r[3], "path": r[4],
                "validation": json.loads(r[5]) if r[5] else None}

    def export_csv(self, path: str | os.PathLike) -> int:
        """Write ``object_id,label`` of every class label (marks left out) atomically; returns the rows written."""
        import csv

        path = os.fspath(path)
        rows = [(lab.object_id, lab.label) for lab in self.labels() if lab.kind == "class"]
        with atomic.replacing(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["object_id", "label"])
            w.writerows(rows)
        return len(rows)
