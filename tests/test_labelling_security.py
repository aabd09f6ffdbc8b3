"""The labelling server against other web pages and bad clients: CSRF, slow clients, deeply nested JSON.

- Leasing rows changes state, so it is a POST: an ``<img src=".../api/next?...">`` of any page leases nothing.
- Every POST is refused when a browser says it comes from another site (``Origin``, ``Sec-Fetch-Site``).
- A client that sends half a request, or drips it byte by byte, is cut off; it cannot hold the server.
- JSON nested deeper than the limit is a 400, not a 500.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import numpy as np
import pytest

from galaxalign_batch.labelling import server as server_mod
from galaxalign_batch.labelling.task import build_app
from galaxalign_batch.store import EmbeddingStore

S1, S2 = "session-one-0001", "session-two-0002"


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    """A store of 200 rows in 4 clusters (no tiles: the API without pictures)."""
    rng = np.random.default_rng(0)
    dim, n = 16, 200
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:4] * 3.0
    emb = centres[rng.integers(0, 4, n)] + rng.normal(scale=0.3, size=(n, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    path = tmp_path_factory.mktemp("sec") / "blobs.zarr"
    store = EmbeddingStore.create(path, dim, dtype="float32", rows_per_chunk=64,
                                  attrs={"model": {"name": "blobs", "id": "blobs"}})
    store.commit([("blobs", {"object_id": np.array([f"blob/{i}" for i in range(n)]), "ra": rng.uniform(0, 1, n),
                             "dec": rng.uniform(0, 1, n), "x": np.zeros(n, np.float32), "y": np.zeros(n, np.float32),
                             "masked_fraction": np.zeros(n, np.float32), "embedding": emb.astype(np.float32)}, "")])
    store.finalize()
    return path


@pytest.fixture
def served(blobs, tmp_path, monkeypatch):
    monkeypatch.setattr(server_mod.Handler, "timeout", 1.0)  # idle
    monkeypatch.setattr(server_mod, "REQUEST_TIMEOUT_S", 2.5)  # whole request
    monkeypatch.setattr(server_mod.LabelServer, "max_connections", 6)
    app = build_app(str(blobs), "t", ["a", "b"], db=str(tmp_path / "t.sqlite"), retrain_every=1000)
    server, _ = server_mod.make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield app, server.server_address[1]
    server.shutdown()
    server.server_close()
    app.close()
    app.db.close()


def request(port, method, path, body=None, headers=None, raw=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        h.setdefault("Content-Type", "application/json")
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.read()
    c.close()
    return r.status, (json.loads(out) if r.getheader("Content-Type", "").startswith("application/json") else out)


# ---------------------------------------------------------------------------------------------- CSRF

def test_leases_are_taken_only_by_post(served):
    app, port = served
    for _ in range(5):  # what <img src="http://127.0.0.1:PORT/api/next?session=...&n=50"> tags would do
        status, body = request(port, "GET", f"/api/next?session={S1}&n=50",
                               headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "image"})
        assert status == 405 and "use POST" in body["error"]
    assert app.queue.remaining() == app.store.n_rows
    status, body = request(port, "POST", "/api/next", {"session": S2, "n": 6})
    assert status == 200 and len(body["items"]) == 6


@pytest.mark.parametrize("headers, why", [
    ({"Origin": "http://evil.example"}, "cross-origin"),
    ({"Origin": "null"}, "cross-origin"),
    ({"Origin": "http://127.0.0.1:1"}, "cross-origin"),          # another port is another origin
    ({"Sec-Fetch-Site": "cross-site"}, "cross-site"),
    ({"Sec-Fetch-Site": "same-site"}, "cross-site"),             # a sibling subdomain is not this server
])
def test_cross_site_posts_are_refused_and_change_nothing(served, headers, why):
    app, port = served
    oid = str(app.store.read("object_id", np.array([0]))[0])
    for path, body in (("/api/label", {"session": S1, "object_id": oid, "label": "a"}),
                       ("/api/undo", {"session": S1}), ("/api/next", {"session": S1, "n": 10})):
        status, res = request(port, "POST", path, body, headers=headers)
        assert status == 403 and why in res["error"], (path, status, res)
    assert app.db.n_events() == 0 and app.queue.remaining() == app.store.n_rows


def test_same_origin_browser_posts_are_served(served):
    app, port = served
    oid = str(app.store.read("object_id", np.array([0]))[0])
    same = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert request(port, "POST", "/api/next", {"session": S1, "n": 2}, headers=same)[0] == 200
    assert request(port, "POST", "/api/label", {"session": S1, "object_id": oid, "label": "a"}, headers=same)[0] == 200
    localhost = {"Origin": f"http://localhost:{port}", "Host": f"localhost:{port}"}
    assert request(port, "POST", "/api/undo", {"session": S1}, headers=localhost)[0] == 200
    assert app.db.n_events() == 2


# ---------------------------------------------------------------------------------------------- JSON depth

def test_deeply_nested_json_is_a_400(served):
    app, port = served
    deep = b"[" * 100000 + b"]" * 100000
    status, res = request(port, "POST", "/api/label", raw=deep[:16000], headers={"Content-Type": "application/json"})
    assert status == 400 and "nested deeper" in res["error"]
    nested = {"session": S1, "x": json.loads("[" * 20 + "]" * 20)}
    status, res = request(port, "POST", "/api/undo", nested)
    assert status == 400 and "nested deeper than 16" in res["error"]
    fine = {"session": S1, "x": json.loads("[" * 10 + "]" * 10)}
    assert request(port, "POST", "/api/undo", fine)[0] == 200      # within the limit
    assert request(port, "POST", "/api/label", None, raw=b'{"a": "[[[[[[[[[[[[[[[[[[[[[[["}',
                   headers={"Content-Type": "application/json"})[0] == 400   # brackets in strings do not count


# ---------------------------------------------------------------------------------------------- slow clients

def _connect(port) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _closed_within(s: socket.socket, seconds: float) -> float | None:
    """Seconds until the server closes the connection (None if it is still open after ``seconds``)."""
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return time.monotonic() - t0
    except (socket.timeout, TimeoutError):
        return None
    except ConnectionError:
        return time.monotonic() - t0


def test_half_sent_and_dripping_requests_are_cut_off_and_do_not_block_others(served):
    app, port = served
    half = _connect(port)  # headers promise a body that never comes
    half.sendall(f"POST /api/label HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                 "Content-Length: 100\r\n\r\n{\"session\"".encode())
    idle = _connect(port)  # connects and says nothing
    drip = _connect(port)  # sends a byte every 0.4 s: never idle for 1 s, but never done
    stop = threading.Event()

    def dripping():
        line = f"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Pad: {'a' * 200}".encode()
        for b in line:
            if stop.is_set():
                return
            try:
                drip.send(bytes([b]))
            except OSError:
                return
            time.sleep(0.4)

    threading.Thread(target=dripping, daemon=True).start()
    t0 = time.monotonic()
    assert request(port, "GET", "/api/state")[0] == 200           # served while the slow ones hang
    assert time.monotonic() - t0 < 2
    try:
        for s, limit in ((half, 2.0), (idle, 2.0), (drip, 4.0)):
            waited = _closed_within(s, limit + 1.0)
            assert waited is not None, "a slow client still holds its connection"
    finally:
        stop.set()
        for s in (half, idle, drip):
            s.close()
    assert app.db.n_events() == 0
    assert request(port, "GET", "/api/state")[0] == 200


def test_connections_beyond_the_limit_are_closed_at_once(served):
    app, port = served
    held = [_connect(port) for _ in range(6)]  # max_connections = 6 in this test
    try:
        time.sleep(0.2)
        extra = _connect(port)
        assert _closed_within(extra, 0.8) is not None
        extra.close()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the slots free as the held connections close
        try:
            if request(port, "GET", "/api/state")[0] == 200:
                break
        except (ConnectionError, http.client.HTTPException):
            time.sleep(0.1)
    else:
        pytest.fail("the server did not serve again after the connections closed")
