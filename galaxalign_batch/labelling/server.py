"""The labelling web app: a standard-library HTTP server, a JSON API under ``/api/`` and a static page.

API (every answer is JSON unless named; errors are ``{"error": "..."}`` with a 4xx/5xx status):

=========================  ====  ==============================================================
``/``                      GET   the page (``static/index.html``); ``/static/...`` its script and style
``/api/state``             GET   task, classes, counts, head status and validation, recent labels
``/api/next``              POST  ``{"session": S, "n": 6}``: the rows this tab shows now and next (leased to it)
``/api/cutout``            GET   ``?row=R``: PNG of the row's cutout re-made from its tile, north up
``/api/label``             POST  ``{"session", "object_id", "label": CLASS}`` or ``... "mark": "not-sure"|"artefact"``
``/api/undo``              POST  ``{"session"}``: cancel this tab's newest label still in force
``/api/labels``            GET   every current label (``object_id, row, kind, label, event_id, ts``)
``/api/export.csv``        GET   ``object_id,label`` of the class labels (what ``fewshot --labels`` reads)
=========================  ====  ==============================================================

Bound to a loopback address, requests must name that host (no DNS rebinding); bound elsewhere, every
request needs the random ``token`` (query parameter or ``X-Token`` header), else 403. Everything that
changes state (labels, undo, and leasing rows with ``/api/next``) is a POST: a GET (an ``<img>`` tag of
any web page) changes nothing. Every POST is checked against cross-site use: an ``Origin`` header must
be this server's own origin and ``Sec-Fetch-Site`` (sent by browsers) must be ``same-origin`` or
``none``, else 403; bodies must be ``application/json`` (a cross-site form cannot send that without a
CORS preflight, which is refused), at most 16 KiB and nested at most :data:`MAX_JSON_DEPTH` deep
(else 400). Each connection may sit idle :data:`IDLE_TIMEOUT_S` seconds and a request must arrive
whole within :data:`REQUEST_TIMEOUT_S`; at most :data:`MAX_CONNECTIONS` are served at once, so slow or
half-sent requests cannot hold the server's threads. A label is committed to SQLite before its answer
is sent.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

import numpy as np

from galaxalign_batch.labelling.db import MARKS, LabelDB
from galaxalign_batch.labelling.queue import ActiveQueue, IdIndex
from galaxalign_batch.labelling.trainer import Trainer
from galaxalign_batch.store import EmbeddingStore

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
#: deepest nesting of arrays/objects a JSON body may have (the API's bodies are flat objects)
MAX_JSON_DEPTH = 16
#: a connection idle (no byte received) this long is closed
IDLE_TIMEOUT_S = 10.0
#: a request (line, headers and body) must be received within this many seconds of its first byte
REQUEST_TIMEOUT_S = 30.0
#: connections served at once; more are closed at once
MAX_CONNECTIONS = 32
SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
STATIC = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8",
          "index.html": "text/html; charset=utf-8"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LabelApp:
    """Everything a request needs: the store, its id index, the database, the queue, the trainer."""

    def __init__(self, store: EmbeddingStore, db: LabelDB, ids: IdIndex, queue: ActiveQueue, trainer: Trainer, *,
                 token: str | None = None, roots: list[str] | None = None, cache_images: int = 512):
        self.store, self.db, self.ids, self.queue, self.trainer = store, db, ids, queue, trainer
        self.token = token
        self.spec = store.cutout_spec
        self.opener = store.tile_opener(roots, keep=4)
        self._images: OrderedDict[int, bytes] = OrderedDict()
        self._cache_images = cache_images
        self._render_lock = threading.Lock()
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="label-prefetch")
        self.allowed_hosts: set[str] | None = None
        self.cookie_name = "galaxalign_label_token"
        self.static = resources.files("galaxalign_batch.labelling") / "static"

    # ---- pictures --------------------------------------------------------------------------------------------
    def cutout_png(self, row: int) -> bytes:
        """The row's cutout as a PNG at the cutout's own size (the page scales it up), cached."""
        with self._render_lock:
            if row in self._images:
                self._images.move_to_end(row)
                return self._images[row]
            from PIL import Image

            from galaxalign_batch.preprocess.pictures import to_rgb8

            pix = self.store.cutouts([row], self.spec, opener=self.opener).get(row)
            img = (Image.fromarray(to_rgb8(pix, self.spec.orientation)) if pix is not None
                   else _no_tile_picture(self.spec.out_size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
            self._images[row] = data
            while len(self._images) > self._cache_images:
                self._images.popitem(last=False)
            return data

    def warm_up(self) -> None:
        """Render one cutout before serving: the first one opens a tile and loads the compiled kernels (seconds)."""
        rows = self.queue.base[:1]
        if len(rows):
            self.cutout_png(int(rows[0]))

    def prefetch(self, rows: list[int]) -> None:
        for r in rows:
            if r not in self._images:
                self._prefetch.submit(self._quiet_render, r)

    def _quiet_render(self, row: int) -> None:
        try:
            self.cutout_png(row)
        except Exception as e:  # a prefetch failure is retried (and reported) by the real request
            log.debug("prefetch of row %d failed: %s", row, e)

    # ---- API -------------------------------------------------------------------------------------------------
    def items(self, rows: list[int]) -> list[dict]:
        if not rows:
            return []
        idx = np.asarray(rows, dtype=np.int64)
        order = np.argsort(idx)
        cols = {}
        for name in ("object_id", "ra", "dec", "tile", "masked_fraction"):
            v = self.store.read(name, idx[order])
            out = np.empty(len(idx), dtype=object)
            out[order] = list(v)
            cols[name] = out
        return [{"row": int(r), "object_id": str(cols["object_id"][i]), "ra": float(cols["ra"][i]),
                 "dec": float(cols["dec"][i]), "tile": os.path.basename(str(cols["tile"][i])),
                 "masked_fraction": round(float(cols["masked_fraction"][i]), 3)}
                for i, r in enumerate(rows)]

    def state(self) -> dict:
        counts = self.db.counts()
        return {"task": self.db.task, "store": os.path.abspath(self.store.path), "rows": self.store.n_rows,
                "classes": self.db.classes, "marks": list(MARKS), "counts": counts,
                "labelled": sum(counts[c] for c in self.db.classes), "marked": sum(counts[m] for m in MARKS),
                "remaining": self.queue.remaining(), "head": self.trainer.snapshot(),
                "recent": [lab.as_dict() for lab in self.db.recent(25)], "model": (self.store.attrs.get("model") or {}).get("name")}

    def next_rows(self, session: str, n: int) -> dict:
        rows = self.queue.next(session, n)
        self.prefetch(rows)
        return {"items": self.items(rows), "ranked_by": self.queue.ranked_by}

    def label(self, body: dict) -> dict:
        session = _session(body.get("session"))
        object_id = body.get("object_id")
        if not isinstance(object_id, str) or not object_id or len(object_id) > 512:
            raise HTTPError(400, "object_id: a non-empty string expected")
        has_label, has_mark = "label" in body, "mark" in body
        if has_label == has_mark:
            raise HTTPError(400, "give exactly one of 'label' (a class) or 'mark' (not-sure, artefact)")
        if has_label:
            kind, label = "class", body["label"]
            if not isinstance(label, str) or label not in self.db.classes:
                raise HTTPError(400, f"unknown class {str(label)[:80]!r}; this task's classes: {', '.join(self.db.classes)}")
        else:
            kind, label = body["mark"], None
            if kind not in MARKS:
                raise HTTPError(400, f"unknown mark {str(kind)[:80]!r}; marks: {', '.join(MARKS)}")
        row = self.ids.row(object_id)
        if row is None:
            raise HTTPError(404, f"unknown object id {object_id[:200]!r}: not in the store")
        lab = self.db.add_label(session, object_id, row, kind, label)
        self.queue.set_labelled(row, True)
        self.trainer.changed()
        return {"label": lab.as_dict(), "counts": self.db.counts()}

    def undo(self, body: dict) -> dict:
        session = _session(body.get("session"))
        res = self.db.undo_last(session)
        if res is None:
            return {"undone": None, "counts": self.db.counts()}
        eid, object_id, row, now = res
        self.queue.set_labelled(row, now is not None)
        if now is None:
            self.queue.put_front(session, row)
        self.trainer.changed()
        return {"undone": {"event_id": eid, "object_id": object_id, "row": row,
                           "now": now.as_dict() if now else None}, "counts": self.db.counts()}

    def export_csv(self) -> bytes:
        import csv

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["object_id", "label"])
        w.writerows((lab.object_id, lab.label) for lab in self.db.labels() if lab.kind == "class")
        return buf.getvalue().encode("utf-8")

    def close(self) -> None:
        self._prefetch.shutdown(wait=False, cancel_futures=True)


def json_depth(raw: bytes) -> int:
    """The deepest nesting of ``[``/``{`` in a JSON text (strings skipped), without parsing it."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in raw:
        if in_str:
            if escaped:
                escaped = False
            elif ch == 0x5C:  # backslash
                escaped = True
            elif ch == 0x22:  # quote
                in_str = False
        elif ch == 0x22:
            in_str = True
        elif ch in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif ch in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _session(value) -> str:
    if not isinstance(value, str) or not SESSION_RE.match(value):
        raise HTTPError(400, "session: 8-64 letters, digits, '-' or '_' expected")
    return value


def _no_tile_picture(size: int):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (90, 90, 90))
    ImageDraw.Draw(img).text((4, size // 2 - 6), "no tile", fill=(230, 230, 230))
    return img


class Handler(BaseHTTPRequestHandler):
    server_version = "galaxalign-label/1"
    protocol_version = "HTTP/1.1"
    app: LabelApp  # set on the subclass made by make_server

    GET = {"/", "/index.html", "/api/state", "/api/cutout", "/api/labels", "/api/export.csv"}
    POST = {"/api/label", "/api/undo", "/api/next"}
    timeout = IDLE_TIMEOUT_S  # socket timeout of each connection (StreamRequestHandler.setup)

    def log_message(self, fmt, *args):  # requests at DEBUG, not on stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def log_error(self, fmt, *args):  # timeouts of idle connections and the like: not on stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def handle_one_request(self):
        """One request, which must arrive whole within REQUEST_TIMEOUT_S (slow-drip clients are cut off)."""
        timer = threading.Timer(REQUEST_TIMEOUT_S, self._cut_off)
        timer.daemon = True
        self._timer = timer
        timer.start()
        try:
            super().handle_one_request()
        except (TimeoutError, ConnectionError, OSError) as e:  # the client went away or was cut off
            log.debug("connection from %s closed: %s", self.address_string(), e)
            self.close_connection = True
        finally:
            timer.cancel()

    def _cut_off(self) -> None:
        log.debug("request from %s not received within %.0f s: closing", self.address_string(), REQUEST_TIMEOUT_S)
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _received(self) -> None:
        """The whole request is in: its handling is not cut off by the request deadline."""
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()

    # ---- dispatch ----------------------------------------------------------------------------------------------
    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def do_PATCH(self):
        self._handle("PATCH")

    def do_OPTIONS(self):
        self._handle("OPTIONS")

    def _handle(self, method: str) -> None:
        self._extra_headers: dict[str, str] = {}
        try:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            if (self.headers.get("Content-Length") or "0").strip() in ("", "0"):
                self._received()  # no body to wait for: handling (a first cutout takes seconds) is not cut off
            self._check_access(query)
            path = url.path
            if method not in ("GET", "HEAD"):
                self._check_origin()
            if path in self.POST:
                if method != "POST":
                    raise HTTPError(405, f"{path}: use POST", {"Allow": "POST"})
                self._post(path)
            elif path in self.GET or path.startswith("/static/"):
                if method not in ("GET", "HEAD"):
                    raise HTTPError(405, f"{path}: use GET", {"Allow": "GET, HEAD"})
                self._get(path, query, head=method == "HEAD")
            else:
                raise HTTPError(404, f"no such page or API: {path[:200]}")
        except HTTPError as e:
            if method not in ("GET", "HEAD"):
                self.close_connection = True  # a body may be left unread
            self._json({"error": e.message}, e.status, e.headers)
        except (TimeoutError, ConnectionError) as e:  # a body that never came, a client that went away
            log.debug("%s %s: connection closed (%s)", method, self.path, e)
            self.close_connection = True
        except Exception as e:
            log.exception("request %s %s failed", method, self.path)
            self._json({"error": f"internal error: {type(e).__name__}: {e}"}, 500)

    def _check_access(self, query: dict) -> None:
        app = self.app
        if app.allowed_hosts is not None:
            host = (self.headers.get("Host") or "").lower()
            if host not in app.allowed_hosts:
                raise HTTPError(403, f"host {host[:100]!r} not allowed (open the URL the server printed)")
        if app.token:
            given = query.get("token") or self.headers.get("X-Token") or self._cookie(app.cookie_name) or ""
            if not hmac.compare_digest(given.encode(), app.token.encode()):
                raise HTTPError(403, "missing or wrong token (open the URL the server printed, with its ?token=...)")
            if query.get("token"):  # the page's own requests (script, style, pictures) then carry it as a cookie
                self._extra_headers["Set-Cookie"] = (f"{app.cookie_name}={app.token}; Path=/; HttpOnly; "
                                                     "SameSite=Strict")

    def _check_origin(self) -> None:
        """Refuse a state-changing request a browser sends on behalf of another site (CSRF).

        Browsers send ``Sec-Fetch-Site`` and ``Origin`` with every POST; other clients (curl, scripts)
        send neither and are judged by the host/token checks alone.
        """
        site = (self.headers.get("Sec-Fetch-Site") or "").strip().lower()
        if site and site not in ("same-origin", "none"):
            raise HTTPError(403, f"cross-site request refused (Sec-Fetch-Site: {site[:40]})")
        origin = self.headers.get("Origin")
        if origin is not None:
            host = (self.headers.get("Host") or "").lower()
            allowed = {f"http://{h}" for h in (self.app.allowed_hosts or {host})}
            if origin.strip().lower() not in allowed:
                raise HTTPError(403, f"cross-origin request refused (Origin: {origin[:100]})")

    def _cookie(self, name: str) -> str | None:
        from http.cookies import CookieError, SimpleCookie

        try:
            c = SimpleCookie(self.headers.get("Cookie") or "")
        except CookieError:
            return None
        return c[name].value if name in c else None

    def _get(self, path: str, query: dict, head: bool) -> None:
        app = self.app
        if path in ("/", "/index.html"):
            return self._static("index.html", head)
        if path.startswith("/static/"):
            return self._static(path[len("/static/"):], head)
        if path == "/api/state":
            return self._json(app.state(), head=head)
        if path == "/api/cutout":
            row = _int(query.get("row"), "row", 0, app.store.n_rows - 1)
            return self._send(200, app.cutout_png(row), "image/png", {"Cache-Control": "private, max-age=3600"}, head)
        if path == "/api/labels":
            return self._json({"labels": [lab.as_dict() for lab in app.db.labels()]}, head=head)
        if path == "/api/export.csv":
            fname = re.sub(r"[^A-Za-z0-9_.-]", "_", app.db.task) + "-labels.csv"
            return self._send(200, app.export_csv(), "text/csv; charset=utf-8",
                              {"Content-Disposition": f'attachment; filename="{fname}"'}, head)
        raise HTTPError(404, f"no such API: {path}")

    def _post(self, path: str) -> None:
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(415, "POST bodies must be application/json")
        length = self.headers.get("Content-Length")
        if length is None:
            raise HTTPError(411, "Content-Length required")
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, "bad Content-Length") from None
        if n < 0:
            raise HTTPError(400, "bad Content-Length")
        if n > MAX_BODY:
            if n <= 64 * MAX_BODY:  # read it away, so the client gets the answer rather than a reset connection
                self.rfile.read(n)
            raise HTTPError(413, f"request body larger than {MAX_BODY} bytes")
        raw = self.rfile.read(n)
        if len(raw) < n:
            raise ConnectionError(f"body cut short ({len(raw)} of {n} bytes)")
        self._received()
        if json_depth(raw) > MAX_JSON_DEPTH:
            raise HTTPError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError(400, f"malformed JSON ({e})") from None
        except RecursionError:
            raise HTTPError(400, f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "a JSON object expected")
        if path == "/api/next":
            n_rows = body.get("n", 6)
            if isinstance(n_rows, bool) or not isinstance(n_rows, int):
                raise HTTPError(400, "n: an integer expected")
            out = self.app.next_rows(_session(body.get("session")), _int(n_rows, "n", 1, 50))
        else:
            out = self.app.label(body) if path == "/api/label" else self.app.undo(body)
        self._json(out)

    # ---- answers -----------------------------------------------------------------------------------------------
    def _static(self, name: str, head: bool) -> None:
        if name not in STATIC:
            raise HTTPError(404, f"no such file: {name[:100]}")
        data = (self.app.static / name).read_bytes()
        self._send(200, data, STATIC[name], {"Cache-Control": "no-cache"}, head)

    def _json(self, obj, status: int = 200, headers: dict | None = None, head: bool = False) -> None:
        data = json.dumps(obj, allow_nan=False, default=_jsonable).encode("utf-8")
        self._send(status, data, "application/json", {"Cache-Control": "no-store", **(headers or {})}, head)

    def _send(self, status: int, data: bytes, ctype: str, headers: dict, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in {**self._extra_headers, **headers}.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)


def _jsonable(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _int(text, what: str, lo: int, hi: int) -> int:
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise HTTPError(400, f"{what}: an integer expected") from None
    if not lo <= v <= hi:
        raise HTTPError(400 if what != "row" else 404, f"{what} {v} out of range [{lo}, {hi}]")
    return v


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    max_connections = MAX_CONNECTIONS

    def server_activate(self) -> None:
        super().server_activate()
        self._slots = threading.BoundedSemaphore(self.max_connections)

    def process_request(self, request, client_address) -> None:
        """Serve in a thread while fewer than ``max_connections`` are being served; else close at once."""
        if not self._slots.acquire(blocking=False):
            log.debug("%s: %d connections already open; closing", client_address, self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


def make_server(app: LabelApp, host: str = "127.0.0.1", port: int = 0) -> tuple[LabelServer, str]:
    """Bind the server (port 0: a free port); returns it and the URL to open (with the token when one is set)."""
    handler = type("BoundHandler", (Handler,), {"app": app})
    cls = LabelServer
    if ":" in host:
        cls = type("LabelServer6", (LabelServer,), {"address_family": socket.AF_INET6})
    try:
        server = cls((host, port), handler)
    except OSError as e:
        from galaxalign_batch.errors import ConfigError

        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    bound = server.server_address[1]
    app.cookie_name = f"galaxalign_label_token_{bound}"
    shown = f"[{host}]" if ":" in host else host
    if is_loopback(host):
        names = {host, "localhost", "127.0.0.1", "[::1]", shown}
        app.allowed_hosts = {f"{h}:{bound}" for h in names}
    else:
        app.allowed_hosts = None
        if host in ("0.0.0.0", "::", ""):
            shown = socket.getfqdn()
    url = f"http://{shown}:{bound}/"
    if app.token:
        url += f"?token={app.token}"
    return server, url


def new_token() -> str:
    return secrets.token_urlsafe(24)


def serve(server: LabelServer, app: LabelApp) -> None:
    """Serve until interrupted; then stop the trainer and close the database."""
    try:
        server.serve_forever(poll_interval=0.25)
    finally:
        server.server_close()
        app.trainer.stop()
        app.close()
        app.db.close()
        time.sleep(0)
