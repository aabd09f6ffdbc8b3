"""Whole-file replaces (galaxalign_batch/atomic.py): the one way the project writes an output file.

Failure the way it happens: an exception inside the write, a process SIGKILLed between writing the
temporary file and renaming it, two writers of one file at once (in one process, interleaved, and in
two processes with a reader watching).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from galaxalign_batch import atomic


def test_replaces_whole_and_leaves_nothing_behind(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    with atomic.replacing(target) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and tmp.endswith(".csv")
        assert os.path.basename(tmp).startswith(".table.csv.")  # hidden: a glob of *.csv does not see it
        assert not target.exists()  # nothing published before the rename
        with open(tmp, "w") as f:
            f.write("a,b\n1,2\n")
    assert target.read_text() == "a,b\n1,2\n"
    assert os.listdir(target.parent) == ["table.csv"]


def test_an_exception_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "x.json"
    atomic.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic.replacing(target) as tmp:
            with open(tmp, "w") as f:
                f.write('{"v": 2, "trunc')
            raise RuntimeError("half-way")
    assert target.read_text() == '{\n "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["x.json"]


def test_a_writer_that_wrote_nothing_is_an_error_not_an_empty_file(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        with atomic.replacing(target):
            pass
    assert not target.exists()


def test_two_interleaved_writers_each_publish_a_whole_file(tmp_path):
    """Writer A starts, B writes the same file completely, then A finishes: both renames publish whole
    files and the last one wins. With one shared temporary name (``out.partial``, what the project did
    before) B would write into A's file and A's rename would fail or publish B's half."""
    target = tmp_path / "out.txt"
    with atomic.replacing(target) as tmp_a:
        with open(tmp_a, "w") as f:
            f.write("A" * 1000)
        with atomic.replacing(target) as tmp_b:
            assert tmp_b != tmp_a
            with open(tmp_b, "w") as f:
                f.write("B" * 10)
        assert target.read_text() == "B" * 10
        with open(tmp_a, "a") as f:
            f.write("A" * 1000)
    assert target.read_text() == "A" * 2000
    assert atomic.partials(tmp_path) == []


WRITER = textwrap.dedent("""
    import sys
    from galaxalign_batch import atomic
    path, byte, n = sys.argv[1], sys.argv[2].encode(), int(sys.argv[3])
    for _ in range(n):
        atomic.write_bytes(path, byte * 262144)
""")


def test_two_processes_writing_one_file_never_show_a_mix(tmp_path):
    """Two processes replace the same file 150 times each while this one reads it: every read is one
    writer's whole file (256 KiB of one byte), never a torn or mixed one."""
    target = tmp_path / "shared.bin"
    atomic.write_bytes(target, b"0" * 262144)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), b, "150"]) for b in ("a", "b")]
    seen = set()
    reads = 0
    while any(p.poll() is None for p in procs) or reads < 5:
        data = target.read_bytes()
        reads += 1
        assert len(data) == 262144 and data.count(data[:1]) == len(data), "a torn or mixed file was read"
        seen.add(data[:1])
    assert [p.wait() for p in procs] == [0, 0]
    assert target.read_bytes() in (b"a" * 262144, b"b" * 262144)
    assert atomic.partials(tmp_path) == []
    assert reads > 5 and seen & {b"a", b"b"}


KILLED = textwrap.dedent("""
    import os, signal, sys
    from galaxalign_batch import atomic
    path, where = sys.argv[1], sys.argv[2]
    with atomic.replacing(path) as tmp:
        with open(tmp, "w") as f:
            f.write("new " * 1000)
            if where == "writing":
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        if where == "before-rename":
            os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("where", ["writing", "before-rename"])
def test_a_writer_killed_before_its_rename_leaves_the_old_file(tmp_path, where):
    target = tmp_path / "catalog.fits"
    target.write_text("old")
    p = subprocess.run([sys.executable, "-c", KILLED, str(target), where])
    assert p.returncode == -signal.SIGKILL
    assert target.read_text() == "old"
    left = atomic.partials(tmp_path)
    assert len(left) == 1 and left[0].name.startswith(".catalog.fits.") and left[0].suffix == ".fits"
    assert all(not atomic.is_partial(n) for n in ("catalog.fits", "x.partial-notes.txt", "a.fits.fz"))


def test_exclusive_creates_once(tmp_path):
    target = tmp_path / "lock"
    atomic.write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic.write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["lock"]


def test_durable_writes_and_the_store_naming(tmp_path):
    target = tmp_path / "c" / "0"
    atomic.write_bytes(target, b"chunk", durable=True, hidden=False, keep_suffix=False)
    assert target.read_bytes() == b"chunk"
    name = atomic.temporary_name(target, hidden=False, keep_suffix=False).name
    assert name.startswith("0.") and name.endswith(atomic.PARTIAL)  # what the store's remove_partials removes


def test_the_temporary_keeps_the_extension_libraries_choose_formats_by(tmp_path):
    from astropy.table import Table

    target = tmp_path / "t.ecsv"
    with atomic.replacing(target) as tmp:
        Table({"a": [1, 2]}).write(tmp)  # no format given: astropy reads it from the name
    assert Table.read(target)["a"].tolist() == [1, 2]
