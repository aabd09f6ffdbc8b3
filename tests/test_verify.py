"""Corruption is detected, not trusted: `verify`, and the read paths of `classify` and `search`.

A store of 600 rows in 3 shard files per array (8-row chunks, 256-row shards) embedded "by" a tiny
checkpoint, damaged in the ways a file system or a user can: a deleted shard file, a truncated one,
a chunk that reads as zeros. Every reader fails with one line naming the store, the array and the
chunk (exit 1); `verify` lists the damage and `--repair` rolls back so that a re-run redoes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zlib

import numpy as np
import pytest
import torch
import zarr

from galaxalign_batch.cli import main
from galaxalign_batch.store import EmbeddingStore, open_store
from galaxalign_batch.store.verify import verify_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

TILES = [f"{10000 + i}/{1500 + i:04d}p022" for i in range(12)]  # 12 tiles of 50 rows
PER_TILE = 50


def tile_rows(tile: str, dim: int) -> dict:
    rng = np.random.default_rng(zlib.crc32(tile.encode()))
    release, brick = tile.split("/")
    e = rng.normal(size=(PER_TILE, dim))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return dict(embedding=e.astype(np.float32), object_id=np.array([f"{release}/{brick}/{i}" for i in range(PER_TILE)]),
                ra=rng.uniform(150, 150.3, PER_TILE), dec=rng.uniform(2, 2.3, PER_TILE), tile=np.full(PER_TILE, brick),
                x=np.zeros(PER_TILE, np.float32), y=np.zeros(PER_TILE, np.float32),
                masked_fraction=np.zeros(PER_TILE, np.float32))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from galaxalign_batch.downstream.classify import checkpoint_identity
    from galaxalign_batch.model.checkpoint import save_model
    from galaxalign_batch.model.train import TrainConfig, build_model

    tmp = tmp_path_factory.mktemp("verify")
    torch.manual_seed(0)
    model = build_model(TrainConfig(data=str(tmp), out=str(tmp / "out"), mode="trimodal"))
    ckpt = save_model(model, tmp / "tiny.safetensors")
    dim = int(model.embed_dim)
    path = tmp / "clean.zarr"
    store = EmbeddingStore.create(path, dim, attrs={"model": checkpoint_identity(ckpt), "vocabulary": None,
                                                    "cutout_spec": None, "normalised": True}, rows_per_chunk=8)
    for i in range(0, len(TILES), 3):
        store.commit([(t.split("/")[1], tile_rows(t, dim), "") for t in TILES[i:i + 3]])
    store.finalize()
    assert store.n_rows == 600 and store.chunk_key("embedding", 300) == "embedding/c/1/0"
    return {"tmp": tmp, "ckpt": ckpt, "clean": path, "dim": dim}


def fresh(setup, name: str):
    path = setup["tmp"] / name
    shutil.rmtree(path, ignore_errors=True)
    shutil.copytree(setup["clean"], path)
    return path


def damage(path, how: str) -> str:
    """Damage the store; returns what the messages must name."""
    if how == "deleted-shard":
        os.unlink(path / "embedding" / "c" / "1" / "0")
        return "array embedding, chunk 32 (rows 256-263, file embedding/c/1/0)"
    if how == "truncated-shard":
        f = path / "embedding" / "c" / "1" / "0"
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        return "array embedding, chunk 32"
    if how == "zero-chunk":  # a lost chunk inside a shard: zarr reads it as the fill value (zeros)
        g = zarr.open_group(str(path), mode="r+")
        g["embedding"][264:272] = 0  # all-fill: zarr drops the chunk from the shard
        return "array embedding, chunk 33 (rows 264-271"
    raise ValueError(how)


def one_error_line(caplog) -> str:
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    return errors[0]


def test_a_sound_store_verifies(setup, capsys):
    assert main(["verify", str(setup["clean"])]) == 0
    out = capsys.readouterr().out
    assert "OK: every committed row" in out and "600 rows, 12 tile records (12 tiles done, 0 failed)" in out


@pytest.mark.parametrize("how", ["deleted-shard", "truncated-shard", "zero-chunk"])
def test_damage_makes_verify_classify_and_search_fail_with_one_line(setup, how, caplog, capsys):
    path = fresh(setup, f"{how}.zarr")
    where = damage(path, how)
    # verify: exit 1, the damage named, and what to re-run
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    problems = [ln for ln in out.splitlines() if ln.startswith("PROBLEM")]
    assert problems and any(where.split(" (")[0] in p for p in problems), out
    assert "--repair" in out and "re-embeds the 7 tile(s)" in out  # from the tile holding row 256 (rows 250-299) on
    # classify (--force: the case that used to report success) and search: one line, exit 1, nothing written
    caplog.clear()
    assert main(["--no-progress", "classify", "--store", str(path), "--model", str(setup["ckpt"]),
                 "--method", "text", "--force"]) == 1
    msg = one_error_line(caplog)
    assert str(path) in msg and where.split(" (")[0] in msg and "verify" in msg, msg
    assert "classification" not in json.load(open(path / "zarr.json"))["attributes"]
    caplog.clear()
    assert main(["--no-progress", "search", "--store", str(path), "--object", "10000/1500p022/3", "-k", "5"]) == 1
    msg = one_error_line(caplog)
    assert str(path) in msg and where.split(" (")[0] in msg, msg
    assert not os.path.exists(str(path) + ".lock")


def test_repair_rolls_back_and_the_rerun_restores_the_clean_store(setup, capsys):
    path = fresh(setup, "repair.zarr")
    damage(path, "truncated-shard")
    assert main(["verify", str(path), "--repair"]) == 0
    out = capsys.readouterr().out
    assert "repaired: the store now keeps its first 250 rows (5 tile records)" in out
    store = EmbeddingStore.open(path, "r+")
    assert store.n_rows == 250 and len(store.completed_tiles()) == 5
    for i in range(0, len(TILES), 3):  # the re-run: what embed does with the tiles not yet done
        todo = [t for t in TILES[i:i + 3] if t.split("/")[1] not in store.completed_tiles()]
        if todo:
            store.commit([(t.split("/")[1], tile_rows(t, setup["dim"]), "") for t in todo])
    store.finalize()
    assert main(["verify", str(path)]) == 0
    a, b = open_store(path), open_store(setup["clean"])
    assert np.array_equal(a.read("embedding"), b.read("embedding"))
    assert list(a.read("object_id")) == list(b.read("object_id"))


def test_the_old_failure_rows_committed_ahead_of_the_tile_table_is_found_and_repaired(setup, capsys):
    path = fresh(setup, "ahead.zarr")
    meta = json.load(open(path / "zarr.json"))
    meta["attributes"]["rows_committed"] += 36  # what a kill between two attribute writes used to leave
    json.dump(meta, open(path / "zarr.json", "w"))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM the done tiles hold 600 rows, the commit record says 636" in out
    assert main(["verify", str(path), "--repair"]) == 0
    assert open_store(path).n_rows == 600 and verify_store(path).ok


def test_duplicated_ids_across_tiles_are_found(setup, capsys):
    path = setup["tmp"] / "dup.zarr"
    s = EmbeddingStore.create(path, setup["dim"], attrs={"model": {"id": "x"}}, rows_per_chunk=8)
    s.commit([("1500p022", tile_rows(TILES[0], setup["dim"]), "")])
    s.commit([("copy", tile_rows(TILES[0], setup["dim"]), "")])  # the same catalog under another key
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM array object_id: 50 duplicated id(s), e.g. '10000/1500p022/0' at rows 0 and 50" in out
    assert "keeps the first 50 rows (1 tile records)" in out and "re-embeds the 1 tile(s) after them (copy)" in out


def test_verify_of_something_that_is_not_a_store_is_one_line(tmp_path, caplog):
    (tmp_path / "x.zarr").mkdir()
    assert main(["verify", str(tmp_path / "x.zarr")]) == 1
    assert "not a galaxalign embedding store" in one_error_line(caplog)
