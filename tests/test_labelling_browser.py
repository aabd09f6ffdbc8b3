"""`label` end to end in a real headless browser (Debian chromium driven by Playwright).

The server runs as a real subprocess (`python -m galaxalign_batch label`); a dozen galaxies are labelled
by keyboard and by clicks, one label is undone, the page is reloaded, the server is killed with SIGKILL
and restarted, and every given label must be in the database, shown on the page, and in the export,
with no labelled galaxy served again. ``GALAXALIGN_LABEL_SCREENSHOT=path.png`` also saves a screenshot.
"""

from __future__ import annotations

import csv
import os
import queue
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                               "(pip install playwright; the browser is the system chromium)")
CHROMIUM = next((p for p in (os.environ.get("GALAXALIGN_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                             shutil.which("chromium-browser")) if p and os.path.exists(p)), None)
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no chromium found (apt-get install chromium; or set "
                                 "GALAXALIGN_CHROMIUM)"), pytest.mark.usefixtures("torch_one_thread")]

CLASSES = ["ring", "not-ring", "other"]


@pytest.fixture(scope="module")
def sky_store(tmp_path_factory):
    """A simulated brick embedded with the tiny model: real tiles, ~175 rows."""
    from conftest import simulated_sky_store

    path = simulated_sky_store(tmp_path_factory.mktemp("label-browser"), seed=2)
    return path


class Server:
    """`galaxalign-batch label` as a subprocess; ``url`` once it listens."""

    def __init__(self, store, log_path):
        self.cmd = [sys.executable, "-m", "galaxalign_batch", "--no-progress", "label", "--store", str(store),
                    "--task", "rings", "--classes", ",".join(CLASSES), "--port", "0", "--retrain-every", "4"]
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.log, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        self.url = None
        while self.url is None:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                self.kill()
                raise AssertionError(f"the server did not print its URL; see {log_path}") from None
            if line.startswith("open http"):
                self.url = line.split()[1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


def _shown(page) -> dict[str, str]:
    """The recent-labels list of the page: object id -> label or mark."""
    out = {}
    for li in page.query_selector_all("#recent li"):
        spans = li.query_selector_all("span")
        out[spans[0].text_content()] = spans[1].text_content()
    return out


def _counts(page) -> dict[str, int]:
    return {tr.get_attribute("data-name"): int(tr.query_selector("td.n").text_content())
            for tr in page.query_selector_all("#counts tr")}


def _expected_counts(given: dict[str, str]) -> dict[str, int]:
    out = {c: 0 for c in CLASSES + ["not-sure", "artefact"]}
    for v in given.values():
        out[v] += 1
    return out


def test_label_in_the_browser_survives_reload_and_kill(sky_store, tmp_path):
    server = Server(sky_store, tmp_path / "server.log")
    errors: list[str] = []
    given: dict[str, str] = {}
    served_before: set[str] = set()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1180, "height": 780})
            page.on("pageerror", lambda e: errors.append(str(e)))
            down = []  # while the server is killed, the page's status polls fail (and say so): expected

            page.on("console", lambda m: errors.append(m.text) if m.type == "error" and not down else None)
            page.goto(server.url)
            page.wait_for_selector("#buttons button.class:not([disabled])")
            assert [b.get_attribute("data-label") for b in page.query_selector_all("#buttons button")] == CLASSES
            page.wait_for_function("() => document.getElementById('cutout').naturalWidth > 0")

            def current() -> str:
                return page.text_content("#object-id")

            def wait_moved_on(oid: str) -> None:
                page.wait_for_function(
                    "id => document.getElementById('object-id').textContent !== id && "
                    "!document.querySelector('#buttons button').disabled", arg=oid)

            def act(do, value: str) -> None:
                oid = current()
                assert oid not in given and oid not in served_before
                served_before.add(oid)
                do()
                wait_moved_on(oid)
                assert page.text_content("#message") == f"saved: {oid} → {value}"
                given[oid] = value

            for key, value in [("1", "ring"), ("2", "not-ring"), ("3", "other"), ("n", "not-sure"), ("1", "ring"),
                               ("a", "artefact")]:
                act(lambda: page.keyboard.press(key), value)
            for selector, value in [('button[data-label="ring"]', "ring"), ('button[data-label="not-ring"]', "not-ring"),
                                    ('button[data-label="other"]', "other"), ("#btn-not-sure", "not-sure"),
                                    ('button[data-label="other"]', "other"), ("#btn-artefact", "artefact")]:
                act(lambda: page.click(selector), value)
            assert len(given) == 12

            # undo the last label (Backspace): that galaxy comes back; label it again by click
            last = list(given)[-1]
            page.keyboard.press("Backspace")
            page.wait_for_function("id => document.getElementById('object-id').textContent === id", arg=last)
            assert page.text_content("#message") == f"undone: {last}"
            del given[last]
            served_before.discard(last)
            act(lambda: page.click('button[data-label="not-ring"]'), "not-ring")
            assert given[last] == "not-ring" and len(given) == 12

            page.wait_for_function(f"() => document.querySelectorAll('#recent li').length === {len(given)}")
            assert _shown(page) == given and _counts(page) == _expected_counts(given)

            # reload: everything is still shown, and the page does not offer a labelled galaxy again
            page.reload()
            page.wait_for_selector("#buttons button.class:not([disabled])")
            page.wait_for_function(f"() => document.querySelectorAll('#recent li').length === {len(given)}")
            assert _shown(page) == given and _counts(page) == _expected_counts(given)
            assert current() not in given

            # kill the server (no shutdown of any kind) and start it again
            down.append(True)
            server.kill()
            page.wait_for_function("() => /cannot reach the server/.test(document.getElementById('message').textContent)")
            server = Server(sky_store, tmp_path / "server.log")
            page.goto(server.url)
            down.clear()
            page.wait_for_selector("#buttons button.class:not([disabled])")
            page.wait_for_function(f"() => document.querySelectorAll('#recent li').length === {len(given)}")
            assert _shown(page) == given and _counts(page) == _expected_counts(given)
            # the next galaxy and the queue render after the labels: wait for them too (a race seen in CI)
            page.wait_for_function("() => document.querySelectorAll('#upcoming figcaption').length === 5")
            upcoming = [f.text_content() for f in page.query_selector_all("#upcoming figcaption")]
            assert current() not in given and not set(upcoming) & set(given) and len(upcoming) == 5
            # one more label after the restart, then the head (fitted in the background) shows up
            act(lambda: page.keyboard.press("3"), "other")
            page.wait_for_function("() => /head v\\d+ ready/.test(document.getElementById('head-status').textContent)",
                                   timeout=60_000)
            assert "first round" not in page.text_content("#head")
            if os.environ.get("GALAXALIGN_LABEL_SCREENSHOT"):
                page.screenshot(path=os.environ["GALAXALIGN_LABEL_SCREENSHOT"])
            browser.close()
    finally:
        server.kill()
    assert not errors, errors

    db = sky_store.parent / "sky.zarr.labels" / "rings.sqlite"
    con = sqlite3.connect(db)
    in_db = {o: (lab if kind == "class" else kind) for o, kind, lab in con.execute("SELECT object_id, kind, label FROM labels")}
    undos = con.execute("SELECT COUNT(*) FROM events WHERE action = 'undo'").fetchone()[0]
    con.close()
    assert in_db == given and undos == 1

    out = tmp_path / "labels.csv"
    subprocess.run([sys.executable, "-m", "galaxalign_batch", "label", "--store", str(sky_store), "--task", "rings",
                    "--export", str(out)], check=True, capture_output=True)
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["object_id", "label"]
    assert dict(rows[1:]) == {o: v for o, v in given.items() if v in CLASSES}
