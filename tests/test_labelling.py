"""`label`: the durable label store, the active-learning queue, the trainer, the HTTP API and the CLI."""

from __future__ import annotations

import csv
import http.client
import io
import json
import sqlite3
import threading
import time

import numpy as np
import pytest

from galaxalign_batch.cli import main
from galaxalign_batch.errors import ConfigError
from galaxalign_batch.labelling.db import LabelDB, check_classes
from galaxalign_batch.labelling.queue import ActiveQueue, Clusters, IdIndex, diverse_order, margins
from galaxalign_batch.labelling.server import make_server, new_token
from galaxalign_batch.labelling.task import build_app
from galaxalign_batch.store import EmbeddingStore, open_store

pytestmark = pytest.mark.usefixtures("torch_one_thread")

S1, S2 = "session-one-0001", "session-two-0002"


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def sky_store(tmp_path_factory):
    """A simulated brick embedded with the tiny model: real tiles, ~175 rows."""
    from conftest import simulated_sky_store

    path = simulated_sky_store(tmp_path_factory.mktemp("label-sky"), seed=1)
    assert EmbeddingStore.open(path).n_rows > 60
    return path


def _blob_store(path, n_per: int = 300, k: int = 4, dim: int = 16, seed: int = 0, rows_per_chunk: int = 128):
    """A store of ``k`` well separated clusters (no tiles: for the queue only); returns (path, true cluster)."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:k] * 3.0
    truth = np.repeat(np.arange(k), n_per)
    emb = centres[truth] + rng.normal(scale=0.3, size=(len(truth), dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    perm = rng.permutation(len(truth))
    emb, truth = emb[perm], truth[perm]
    n = len(truth)
    store = EmbeddingStore.create(path, dim, dtype="float32", rows_per_chunk=rows_per_chunk,
                                  attrs={"model": {"name": "blobs", "id": "blobs"}})
    cols = {"object_id": np.array([f"blob/{i}" for i in range(n)]), "ra": rng.uniform(0, 1, n),
            "dec": rng.uniform(0, 1, n), "x": np.zeros(n, np.float32), "y": np.zeros(n, np.float32),
            "masked_fraction": np.zeros(n, np.float32), "embedding": emb.astype(np.float32)}
    store.commit([("blobs", cols, "")])
    store.finalize()
    return path, truth


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    return _blob_store(tmp_path_factory.mktemp("blobs") / "blobs.zarr")


# ---------------------------------------------------------------------------------------------- database

def test_db_last_label_wins_history_kept_and_undo_is_recorded(tmp_path):
    db = LabelDB(tmp_path / "t.sqlite", "t", ["ring", "other"], "s.zarr")
    assert db._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.add_label(S1, "a", 0, "class", "ring")
    db.add_label(S1, "b", 1, "not-sure", None)
    db.add_label(S2, "a", 0, "class", "other")          # another tab relabels a: last wins
    assert db.label_of("a").label == "other" and db.counts() == {"ring": 0, "other": 1, "not-sure": 1, "artefact": 0}
    eid, oid, row, now = db.undo_last(S2)               # tab 2 undoes its label: a is ring again
    assert (oid, row, now.label) == ("a", 0, "ring")
    eid, oid, row, now = db.undo_last(S1)               # tab 1's newest is the mark on b
    assert (oid, now) == ("b", None) and db.label_of("b") is None
    db.add_label(S1, "c", 2, "artefact", None)
    hist = db.history()
    assert [h["action"] for h in hist] == ["label", "label", "label", "undo", "undo", "label"]
    assert hist[2]["undone_by"] == hist[3]["id"] and hist[3]["undoes"] == hist[2]["id"]
    before = [lab.as_dict() for lab in db.labels()]
    db.rebuild_current()                                 # the current table follows from the history
    assert [lab.as_dict() for lab in db.labels()] == before
    db.close()
    again = LabelDB(tmp_path / "t.sqlite", "t", None, "s.zarr")   # reopened: classes and labels kept
    assert again.classes == ["ring", "other"] and [lab.as_dict() for lab in again.labels()] == before
    n = again.export_csv(tmp_path / "out.csv")
    rows = list(csv.reader(open(tmp_path / "out.csv")))
    assert n == 1 and rows == [["object_id", "label"], ["a", "ring"]]   # marks are not exported
    with pytest.raises(ConfigError, match="has classes ring,other"):
        LabelDB(tmp_path / "t.sqlite", "t", ["ring", "bar"], "s.zarr")
    with pytest.raises(ConfigError, match="holds task 't'"):
        LabelDB(tmp_path / "t.sqlite", "other-task", None, "s.zarr")
    with pytest.raises(ValueError):
        again.add_label(S1, "d", 3, "class", "nope")


@pytest.mark.parametrize("classes, message", [
    (["ring", ""], "empty class name"), (["ring", "Ring"], "duplicate class"), (["ring"], "at least two"),
    (["ring", "artefact"], "reserved"), (["a,b", "c"], "no commas")])
def test_bad_class_lists(classes, message):
    with pytest.raises(ConfigError, match=message):
        check_classes(classes)


# ---------------------------------------------------------------------------------------------- queue

def test_first_round_spans_every_cluster_and_serves_each_row_once(blobs, tmp_path):
    path, truth = blobs
    store = open_store(path)
    clusters = Clusters.cached(store, str(tmp_path / "c.npz"), k=4)
    assert (tmp_path / "c.npz").exists() and Clusters.cached(store, str(tmp_path / "c.npz")).label.tolist() == \
        clusters.label.tolist()
    (tmp_path / "c.npz").write_bytes((tmp_path / "c.npz").read_bytes()[:100])  # a cache cut short: recomputed
    assert Clusters.cached(store, str(tmp_path / "c.npz"), k=4).label.tolist() == clusters.label.tolist()
    order = clusters.first_round()
    assert sorted(order.tolist()) == list(range(store.n_rows))
    assert len(set(truth[order[:4]])) == 4          # the first screen shows one galaxy of every cluster
    q = ActiveQueue(store, clusters, [int(order[0])], lease_s=60)
    a, b = q.next(S1, 5), q.next(S2, 5)
    assert int(order[0]) not in a + b and not set(a) & set(b)   # labelled and leased rows are not served twice
    assert q.next(S1, 5) == a                                    # a reload of the tab shows the same rows
    q.set_labelled(a[0])
    assert q.next(S1, 5)[:4] == a[1:]
    q.put_front(S1, 7)
    assert q.next(S1, 3)[0] == 7
    q2 = ActiveQueue(store, clusters, [], lease_s=0.0)           # expired leases go back to the pool
    first = q2.next(S1, 3)
    time.sleep(0.01)
    assert q2.next(S2, 3) == first


def test_diverse_order_round_robin_and_no_near_duplicates():
    rows = np.arange(6)
    score = np.array([0.1, 0.2, 0.3, 0.05, 0.4, 0.5])
    cluster = np.array([0, 0, 0, 1, 1, 2])
    assert diverse_order(rows, score, cluster).tolist() == [3, 0, 5, 1, 4, 2]
    emb = np.eye(6)
    emb[0] = emb[3]  # row 0 duplicates row 3
    out = diverse_order(rows, score, cluster, emb, window=8)
    assert out.tolist() == [3, 5, 1, 4, 2, 0]
    assert np.allclose(margins(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]])), [0.2, 0.85])


def test_rescore_ranks_the_uncertain_rows_first(blobs):
    from galaxalign_batch.fewshot import fit_head

    path, truth = blobs
    store = open_store(path)
    emb = store.read("embedding").astype(np.float32)
    y = (truth >= 2).astype(int)                      # clusters 0,1 vs 2,3
    lab = np.r_[np.flatnonzero(y == 0)[:10], np.flatnonzero(y == 1)[:10]]
    head = fit_head(emb[lab], y[lab], classes=["low", "high"], kind="linear", seed=0)
    q = ActiveQueue(store, Clusters.compute(store, k=4), lab, pool=64)
    q.rescore(head, 1)
    m = margins(head.predict_proba(emb))
    assert q.ranked_by == 1 and np.allclose(q.margin, m, atol=1e-6)
    assert len(q.ranking) == 64 and not np.isin(q.ranking, lab).any()
    unl = np.setdiff1d(np.arange(store.n_rows), lab)
    assert set(q.ranking.tolist()) == set(unl[np.argsort(m[unl])[:64]].tolist())   # the 64 least certain
    served = q.next(S1, 8)
    assert set(served) <= set(q.ranking.tolist())


def test_id_index(blobs):
    ids = IdIndex(open_store(blobs[0]))
    assert ids.row("blob/17") == 17 and ids.row("blob/1200") is None and ids.row("") is None


# ---------------------------------------------------------------------------------------------- HTTP API

class Client:
    def __init__(self, port: int, token: str | None = None, host: str = "127.0.0.1"):
        self.port, self.token, self.host = port, token, host

    def request(self, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        h = {"Host": f"{self.host}:{self.port}", **(headers or {})}
        if self.token:
            h["X-Token"] = self.token
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            h.setdefault("Content-Type", "application/json")
        c.request(method, path, body=data, headers=h)
        r = c.getresponse()
        out = r.read()
        c.close()
        if r.getheader("Content-Type", "").startswith("application/json"):
            return r.status, json.loads(out)
        return r.status, out

    def get(self, path):
        return self.request("GET", path)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)


@pytest.fixture
def served(sky_store, tmp_path):
    """The app of a fresh task on the simulated store, served on a free loopback port in this process."""
    started = []

    def start(token=None, every=3, task="rings", classes=("ring", "not-ring")):
        app = build_app(str(sky_store), task, list(classes), db=str(tmp_path / f"{task}.sqlite"), token=token,
                        retrain_every=every)
        server, url = make_server(app, "127.0.0.1", 0)
        app.trainer.start()
        t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        t.start()
        started.append((server, app))
        return app, Client(server.server_address[1], token), url

    yield start
    for server, app in started:
        server.shutdown()
        server.server_close()
        app.trainer.stop()
        app.close()
        app.db.close()


def test_api_labels_undo_and_state(served):
    app, c, url = served()
    status, st = c.get("/api/state")
    assert status == 200 and st["classes"] == ["ring", "not-ring"] and st["rows"] == app.store.n_rows
    status, nxt = c.post("/api/next", {"session": S1, "n": 4})
    items = nxt["items"]
    assert status == 200 and len(items) == 4 and len({i["row"] for i in items}) == 4
    ids = app.store.read("object_id")
    assert all(ids[i["row"]] == i["object_id"] for i in items)
    status, other = c.post("/api/next", {"session": S2, "n": 4})
    assert not {i["row"] for i in items} & {i["row"] for i in other["items"]}   # two tabs, different galaxies
    status, res = c.post("/api/label", {"session": S1, "object_id": items[0]["object_id"], "label": "ring"})
    assert status == 200 and res["counts"]["ring"] == 1
    # committed before the answer: another connection to the file sees it
    con = sqlite3.connect(app.db.path)
    assert con.execute("SELECT label FROM labels WHERE object_id = ?", (items[0]["object_id"],)).fetchone() == ("ring",)
    status, res = c.post("/api/label", {"session": S1, "object_id": items[1]["object_id"], "mark": "artefact"})
    assert status == 200 and res["label"]["kind"] == "artefact"
    status, nxt2 = c.post("/api/next", {"session": S1, "n": 4})
    assert [i["row"] for i in nxt2["items"][:2]] == [items[2]["row"], items[3]["row"]]
    assert not {items[0]["row"], items[1]["row"]} & {i["row"] for i in nxt2["items"]}
    status, res = c.post("/api/undo", {"session": S1})
    assert status == 200 and res["undone"]["object_id"] == items[1]["object_id"] and res["undone"]["now"] is None
    status, nxt3 = c.post("/api/next", {"session": S1, "n": 4})
    assert nxt3["items"][0]["row"] == items[1]["row"]                 # the undone galaxy is shown again
    status, res = c.post("/api/undo", {"session": S2})
    assert status == 200 and res["undone"] is None                     # tab 2 has nothing to undo
    status, labs = c.get("/api/labels")
    assert [(lab["object_id"], lab["label"]) for lab in labs["labels"]] == [(items[0]["object_id"], "ring")]
    assert con.execute("SELECT COUNT(*) FROM events WHERE action = 'undo'").fetchone() == (1,)
    status, body = c.get("/api/export.csv")
    assert status == 200 and body.decode().splitlines() == ["object_id,label", f"{items[0]['object_id']},ring"]
    status, st = c.get("/api/state")
    assert st["recent"][0]["object_id"] == items[0]["object_id"] and st["labelled"] == 1 and st["marked"] == 0
    con.close()


def test_api_cutout_is_the_stored_rows_cutout_north_up(served):
    from PIL import Image

    from galaxalign_batch.preprocess.pictures import to_rgb8

    app, c, _ = served()
    status, png = c.get("/api/cutout?row=5")
    assert status == 200 and png[:8] == b"\x89PNG\r\n\x1a\n"
    img = np.asarray(Image.open(io.BytesIO(png)))
    expected = to_rgb8(app.store.cutouts([5])[5])
    assert img.shape == expected.shape and np.array_equal(img, expected)
    assert c.get(f"/api/cutout?row={app.store.n_rows}")[0] == 404
    assert c.get("/api/cutout?row=x")[0] == 400


def test_api_rejects_bad_requests_and_writes_nothing(served):
    app, c, _ = served()
    oid = str(app.store.read("object_id", np.array([0]))[0])
    good = {"session": S1, "object_id": oid, "label": "ring"}
    bad = [
        (c.post("/api/label", None, raw=b'{"session": "x', headers={"Content-Type": "application/json"}), 400, "malformed JSON"),
        (c.post("/api/label", None, raw=b"\xff\xfe", headers={"Content-Type": "application/json"}), 400, "malformed JSON"),
        (c.post("/api/label", [1, 2]), 400, "JSON object"),
        (c.post("/api/label", {**good, "object_id": "9999/nowhere/1"}), 404, "unknown object id"),
        (c.post("/api/label", {**good, "object_id": 17}), 400, "object_id"),
        (c.post("/api/label", {**good, "label": "bar"}), 400, "unknown class"),
        (c.post("/api/label", {**good, "label": None}), 400, "unknown class"),
        (c.post("/api/label", {**good, "mark": "artefact"}), 400, "exactly one"),
        (c.post("/api/label", {"session": S1, "object_id": oid, "mark": "boring"}), 400, "unknown mark"),
        (c.post("/api/label", {**good, "session": "short"}), 400, "session"),
        (c.post("/api/label", {**good, "pad": "x" * 20000}), 413, "larger than"),
        (c.post("/api/label", good, headers={"Content-Type": "text/plain"}), 415, "application/json"),
        (c.request("GET", "/api/label"), 405, "use POST"),
        (c.request("DELETE", "/api/labels"), 405, "use GET"),
        (c.request("PUT", "/api/undo", good), 405, "use POST"),
        (c.get("/api/nothing"), 404, "no such"),
        (c.get("/static/../db.py"), 404, "no such"),
        (c.post("/api/next", {"session": S1, "n": 1000}), 400, "out of range"),
        (Client(c.port, host="attacker.example").get("/api/state"), 403, "not allowed"),
    ]
    for (status, body), want_status, want in bad:
        assert status == want_status and want in body["error"], (status, body, want)
    assert app.db.n_events() == 0                                  # not one label written
    assert c.post("/api/label", good)[0] == 200 and app.db.n_events() == 1


def test_token_is_required_off_loopback(served):
    token = new_token()
    app, c, url = served(token=token)
    assert url.endswith(f"?token={token}")
    anon = Client(c.port)
    assert anon.get("/api/state")[0] == 403 and anon.get("/")[0] == 403
    assert Client(c.port, token="wrong").get("/api/state")[0] == 403
    assert c.get("/api/state")[0] == 200
    status, body = anon.get(f"/?token={token}")
    assert status == 200 and b"<!DOCTYPE html>" in body


def test_background_retrain_reranks_and_saves_the_head(served):
    from galaxalign_batch.fewshot import load_head

    app, c, _ = served(every=3, task="morph", classes=("a", "b"))
    ids = []
    for i in range(6):
        item = c.post("/api/next", {"session": S1, "n": 1})[1]["items"][0]
        ids.append(item["object_id"])
        t0 = time.perf_counter()
        assert c.post("/api/label", {"session": S1, "object_id": item["object_id"], "label": "ab"[i % 2]})[0] == 200
        assert time.perf_counter() - t0 < 5                        # requests never wait for training
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        head = c.get("/api/state")[1]["head"]
        if head["ranked_by"] >= 1 and head["state"] == "ready":
            break
        time.sleep(0.2)
    assert head["ranked_by"] >= 1 and head["n_labels"] >= 4, head
    assert head["validation"] is None or 0 <= head["validation"]["accuracy"] <= 1
    saved = load_head(app.trainer.head_path)
    assert saved.classes == ["a", "b"] and saved.source["task"] == "morph"
    assert app.db.last_head()["version"] == head["version"]
    nxt = [i["object_id"] for i in c.post("/api/next", {"session": S1, "n": 5})[1]["items"]]
    assert not set(nxt) & set(ids)
    ranked = {int(r) for r in app.queue.ranking}
    assert ranked and set(app.ids.row(o) for o in nxt[1:]) <= ranked   # upcoming ones follow the head's ranking


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_errors_are_one_line(tmp_path, sky_store, caplog):
    (tmp_path / "notastore").mkdir()
    empty = EmbeddingStore.create(tmp_path / "empty.zarr", 8)
    cases = [
        (["--store", str(tmp_path / "missing.zarr"), "--task", "t", "--classes", "a,b"], "no such store"),
        (["--store", str(tmp_path / "notastore"), "--task", "t", "--classes", "a,b"], "notastore"),
        (["--store", empty.path, "--task", "t", "--classes", "a,b"], "no rows yet"),
        (["--store", str(sky_store), "--task", "t", "--classes", "ring,"], "empty class name"),
        (["--store", str(sky_store), "--task", "t", "--classes", "ring,ring"], "duplicate class"),
        (["--store", str(sky_store), "--task", "../x", "--classes", "a,b"], "task name"),
        (["--store", str(sky_store), "--task", "t"], "give its classes"),
        (["--store", str(sky_store), "--task", "never", "--export", str(tmp_path / "x.csv")], "no label database"),
    ]
    for argv, want in cases:
        caplog.clear()
        assert main(["label", *argv]) == 1, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and want in errors[0] and "\n" not in errors[0], (argv, errors)


def test_cli_export(tmp_path, sky_store, capsys):
    db = tmp_path / "t.sqlite"
    ldb = LabelDB(db, "t", ["ring", "not-ring"], str(sky_store))
    ids = open_store(sky_store).read("object_id")
    ldb.add_label(S1, str(ids[3]), 3, "class", "not-ring")
    ldb.add_label(S1, str(ids[1]), 1, "class", "ring")
    ldb.add_label(S1, str(ids[2]), 2, "not-sure", None)
    ldb.close()
    out = tmp_path / "labels.csv"
    assert main(["label", "--store", str(sky_store), "--task", "t", "--db", str(db), "--export", str(out)]) == 0
    assert "2 label(s)" in capsys.readouterr().out
    assert out.read_text().splitlines() == ["object_id,label", f"{ids[3]},not-ring", f"{ids[1]},ring"]
    from galaxalign_batch.fewshot.labels import read_labels

    read = read_labels(out, classes=["ring", "not-ring"])          # what `fewshot --labels` reads
    assert read.object_ids == [str(ids[3]), str(ids[1])] and read.y.tolist() == [1, 0]


def test_page_puts_data_in_the_dom_as_text_only():
    from importlib import resources

    static = resources.files("galaxalign_batch.labelling") / "static"
    js = (static / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in js
    html = (static / "index.html").read_text()
    assert "http://" not in html and "https://" not in html     # nothing loaded from outside
