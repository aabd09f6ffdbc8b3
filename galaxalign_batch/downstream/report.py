"""`report`: one self-contained HTML page about a store: counts, classes, sky map, examples, confusion matrix.

Every figure is a matplotlib PNG inlined as base64, every thumbnail a cutout re-made from its tile
(see :mod:`galaxalign_batch.store.cutouts`), so the file can be mailed or archived alone.
Truth, when known, comes from the Tractor catalogs of a simulated survey (``true_class_key``),
joined by ``object_id``; otherwise the confusion matrix is skipped with a note.
"""

from __future__ import annotations

import datetime as _dt
import html
import io
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from galaxalign_batch import atomic, progress
from galaxalign_batch._version import __version__
from galaxalign_batch.downstream.common import Classification, classification_of
from galaxalign_batch.preprocess.pictures import png_base64, to_rgb8
from galaxalign_batch.sky import viewer_url
from galaxalign_batch.store import EmbeddingStore, open_readable, schema
from galaxalign_batch.store.cutouts import TileOpener, brick_of_key, survey_roots

log = logging.getLogger(__name__)

MAX_MAP_POINTS = 100_000


@dataclass
class Truth:
    """True classes of store rows (index into the classification's classes), where known."""

    rows: np.ndarray
    labels: np.ndarray
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # true class keys outside the vocabulary -> count


@dataclass
class ReportSummary:
    out: str
    rows: int
    classified: bool
    truth_rows: int
    accuracy: float | None
    seconds: float
    notes: list[str]

    def lines(self) -> list[str]:
        s = f"{self.out}: report of {self.rows} rows"
        if self.classified:
            s += ", classified"
        if self.accuracy is not None:
            s += f"; accuracy {self.accuracy:.3f} on {self.truth_rows} rows with known truth"
        return [s + f" ({self.seconds:.1f} s)"] + [f"note: {n}" for n in self.notes]


# ---------------------------------------------------------------------------------------------- data

def _sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def top_rows_per_class(store: EmbeddingStore, k: int, per_class: int) -> dict[int, np.ndarray]:
    """The ``per_class`` most confident rows of every class (streamed over the label/confidence columns)."""
    best: dict[int, tuple[np.ndarray, np.ndarray]] = {c: (np.zeros(0), np.zeros(0, np.int64)) for c in range(k)}
    for start, cols in store.iter_chunks(["label", "confidence"]):
        lab, conf = cols["label"].astype(np.int64), cols["confidence"]
        for c in np.unique(lab):
            sel = np.flatnonzero(lab == c)
            conf_c = np.concatenate([best[int(c)][0], conf[sel]])
            rows_c = np.concatenate([best[int(c)][1], start + sel])
            order = np.lexsort((rows_c, -conf_c))[:per_class]
            best[int(c)] = (conf_c[order], rows_c[order])
    return {c: v[1] for c, v in best.items()}


def find_truth(store: EmbeddingStore, cls: Classification, roots: Sequence[str]) -> Truth | None:
    """True classes from the Tractor catalogs (``true_class_key``) of the store's brick tiles, when they have one."""
    from galaxalign_batch.survey import layout, read_tractor

    t = store.tile_table()
    index = {k: i for i, k in enumerate(cls.classes)}
    rows_all, labels_all, sources = [], [], set()
    skipped: dict[str, int] = {}
    for name, status, start, count in zip(t["name"], t["status"], t["row_start"], t["row_count"]):
        if status != schema.STATUS_DONE or count == 0:
            continue
        root, brick = brick_of_key(str(name))  # tile keys are ROOT/coadd/AAA/BRICK (bare names in old stores)
        if brick is None:
            continue
        path = next((c for c in ([layout.tractor_path(root, brick)] if root else [])
                     + [layout.tractor_path(r, brick) for r in roots] if c.is_file()), None)
        if path is None:
            continue
        try:
            cat = read_tractor(path, primary_only=False)
        except Exception as e:  # an unreadable catalog only costs the truth of that tile
            log.warning("no truth from %s: %s", path, str(e).splitlines()[0])
            continue
        if "true_class_key" not in cat.colnames:
            continue
        keys = dict(zip(np.asarray(cat["object_id"]).astype(str), np.asarray(cat["true_class_key"]).astype(str)))
        ids = np.asarray(store.read("object_id", slice(int(start), int(start + count)))).astype(object)
        for i, oid in enumerate(ids):
            key = keys.get(oid)
            if key is None:
                continue
            if key in index:
                rows_all.append(int(start) + i)
                labels_all.append(index[key])
            else:
                skipped[key] = skipped.get(key, 0) + 1
        sources.add(str(path.parent.parent.parent))
    if not rows_all:
        return None
    return Truth(np.asarray(rows_all, np.int64), np.asarray(labels_all, np.int64),
                 "Tractor catalogs (true_class_key) under " + ", ".join(sorted(sources)), skipped)


# ---------------------------------------------------------------------------------------------- figures

def _figure_png(fig) -> str:
    import base64

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(k: int):
    plt = _plt()
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(k)]


def class_histogram(counts: np.ndarray, names: list[str]) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar(range(len(names)), counts, color=_colors(len(names)))
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("sources")
    ax.set_title("predicted classes")
    for i, c in enumerate(counts):
        ax.text(i, c, str(int(c)), ha="center", va="bottom", fontsize=7)
    fig.tight_layout()
    return _figure_png(fig)


def sky_map(ra: np.ndarray, dec: np.ndarray, labels: np.ndarray | None, names: list[str] | None) -> str:
    """Scatter of positions (RA increasing to the left), coloured by class; all-sky in Mollweide."""
    plt = _plt()
    centre = np.degrees(np.arctan2(np.sin(np.radians(ra)).mean(), np.cos(np.radians(ra)).mean()))
    dra = (ra - centre + 180.0) % 360.0 - 180.0  # RA offset from the circular mean, no wrap at 0/360
    wide = np.ptp(dra) > 90 or np.ptp(dec) > 60
    if wide:
        fig = plt.figure(figsize=(8, 4.5))
        ax = fig.add_subplot(111, projection="mollweide")
        x, y = -np.radians(dra), np.radians(dec)
        ax.set_xticklabels([])
        ax.grid(True, alpha=0.3)
        ax.set_title(f"sky (Mollweide, centred on RA {centre % 360:.1f})")
    else:
        fig, ax = plt.subplots(figsize=(7, 5.5))
        x, y = dra + centre, dec  # continuous across RA 0/360 (values may leave [0, 360))
        ax.invert_xaxis()
        ax.set_xlabel("RA [deg]")
        ax.set_ylabel("Dec [deg]")
        ax.set_aspect(1.0 / max(np.cos(np.radians(np.median(dec))), 0.05), adjustable="datalim")
        ax.set_title("sky positions")
    size = max(0.5, min(12.0, 4000.0 / max(len(ra), 1)))
    if labels is None:
        ax.scatter(x, y, s=size, c="k", lw=0, alpha=0.7)
    else:
        colors = _colors(len(names))
        for c, name in enumerate(names):
            sel = labels == c
            if sel.any():
                ax.scatter(x[sel], y[sel], s=size, color=colors[c], lw=0, alpha=0.8, label=name)
        ax.legend(fontsize=7, markerscale=max(1.0, 6.0 / size), loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return _figure_png(fig)


def embedding_map(emb: np.ndarray, labels: np.ndarray | None, names: list[str] | None) -> str:
    """The first two principal components of a sample of embeddings, coloured by class."""
    plt = _plt()
    x = emb.astype(np.float64)
    x -= x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(6.5, 5))
    size = max(1.0, min(14.0, 4000.0 / max(len(xy), 1)))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="k", lw=0, alpha=0.6)
    else:
        colors = _colors(len(names))
        for c, name in enumerate(names):
            sel = labels == c
            if sel.any():
                ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colors[c], lw=0, alpha=0.8, label=name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title("embeddings (PCA of a sample)")
    fig.tight_layout()
    return _figure_png(fig)


def confusion_png(cm: np.ndarray, names: list[str], title: str) -> str:
    import base64

    from galaxalign_batch.model.evaluate import plot_confusion

    _plt()
    buf = io.BytesIO()
    plot_confusion(cm, names, title, buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------- the page

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
th{background:#f5f5f5}.note{background:#fff8e1;border-left:4px solid #f0c36d;padding:.4em .8em;margin:.6em 0}
.thumbs{display:flex;flex-wrap:wrap;gap:6px;margin:.3em 0 1em}.thumb{text-align:center;font-size:.7em;width:110px}
.thumb img{width:104px;height:104px;image-rendering:pixelated;border:1px solid #ccc}
.missing{width:104px;height:104px;background:#eee;display:flex;align-items:center;justify-content:center}
img.fig{max-width:100%}
"""


def _kv_table(pairs: list[tuple[str, object]]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in pairs)
    return f"<table>{rows}</table>"


def _grid_table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(store_path: str | os.PathLike, out: str | os.PathLike, *, roots: Sequence[str] | None = None,
                 examples: int = 6, truth: str = "auto", max_points: int = MAX_MAP_POINTS) -> ReportSummary:
    """Write the HTML report of the store at ``store_path`` to ``out`` (see the module docstring)."""
    from galaxalign_batch.model.evaluate import classification_metrics

    t0 = time.perf_counter()
    out = os.fspath(out)
    store = open_readable(store_path)
    attrs = store.attrs
    roots = survey_roots(store, roots)
    cls = classification_of(store)
    notes: list[str] = []
    n = store.n_rows
    failed = store.failed_tiles()
    model = attrs.get("model") or {}
    spec = attrs.get("cutout_spec") or {}

    parts: list[str] = []
    overview = [("store", os.path.abspath(store.path)), ("rows (sources)", n),
                ("tiles done", len(store.completed_tiles())), ("tiles failed", len(failed)),
                ("model", f"{attrs.get('model_path') or model.get('name')} ({model.get('kind')}, id {model.get('id')})"),
                ("embedding", f"{store.dim} x {store.embeddings.dtype}"),
                ("cutouts", f"{spec.get('angular_size')} arcsec, {spec.get('out_size')} px, {spec.get('stretch')} stretch"),
                ("created", attrs.get("created")), ("complete", attrs.get("complete"))]
    if cls is not None:
        overview.append(("classification", f"{cls.method} by {cls.model.get('name')} (id {cls.model.get('id')}), "
                                           f"{len(cls.classes)} classes"))
    parts.append("<h2>Overview</h2>" + _kv_table(overview))
    if failed:
        parts.append("<h3>Failed tiles</h3>" + _grid_table(["tile", "reason"], [[k, v] for k, v in list(failed.items())[:50]]))

    sample = _sample_rows(n, max_points)
    ra, dec = store.read("ra", sample), store.read("dec", sample)
    mf = store.read("masked_fraction", sample)
    flags = store.read("flags", sample)
    parts.append("<h3>Quality flags</h3>" + _kv_table([
        ("partly masked (flag 2)", f"{100 * np.mean(flags & schema.FLAG_MASKED > 0):.1f}%"),
        ("mostly masked (flag 4)", f"{100 * np.mean(flags & schema.FLAG_MOSTLY_MASKED > 0):.1f}%"),
        ("at a tile edge (flag 1)", f"{100 * np.mean(flags & schema.FLAG_EDGE > 0):.1f}%"),
        ("mean masked fraction", f"{float(np.mean(mf)):.3f}"),
    ]) + (f"<p>(from a random sample of {len(sample)} rows)</p>" if len(sample) < n else ""))

    labels_sample = None
    accuracy = None
    truth_rows = 0
    if cls is None:
        notes.append("the store is not classified: run 'galaxalign-batch classify --store STORE --model CKPT' "
                     "for the class histogram, examples and confusion matrix")
    else:
        names = cls.classes
        k = len(names)
        counts = np.zeros(k, np.int64)
        conf_sum = np.zeros(k)
        for _, cols in progress.bar(store.iter_chunks(["label", "confidence"]), total=-(-n // store.chunking[1]),
                                    desc="report", unit="chunk"):
            lab = cols["label"].astype(np.int64)
            counts += np.bincount(lab, minlength=k)[:k]
            conf_sum += np.bincount(lab, weights=cols["confidence"].astype(np.float64), minlength=k)[:k]
        labels_sample = store.read("label", sample).astype(np.int64)
        parts.append("<h2>Classes</h2>" + f'<img class="fig" src="{class_histogram(counts, names)}">' + _grid_table(
            ["class", "label text", "sources", "share", "mean confidence"],
            [[c, cls.labels[i], int(counts[i]), f"{100 * counts[i] / n:.1f}%",
              f"{conf_sum[i] / counts[i]:.3f}" if counts[i] else "-"] for i, c in enumerate(names)]))

    parts.append("<h2>Sky map</h2>" + f'<img class="fig" src="{sky_map(ra, dec, labels_sample, cls.classes if cls else None)}">'
                 + (f"<p>{len(sample)} of {n} sources shown (random sample).</p>" if len(sample) < n else ""))
    emb_rows = sample[_sample_rows(len(sample), 5000, seed=1)]
    emb = store.read("embedding", emb_rows).astype(np.float32)
    emb_labels = store.read("label", emb_rows).astype(np.int64) if cls is not None else None
    if len(emb) >= 3:
        parts.append("<h2>Embedding space</h2>" +
                     f'<img class="fig" src="{embedding_map(emb, emb_labels, cls.classes if cls else None)}">')

    if cls is not None and examples > 0:
        parts.append(_examples_section(store, cls, examples, roots, notes))

    if cls is not None:
        tr = find_truth(store, cls, roots) if truth == "auto" else None
        if tr is None:
            why = ("no truth available: the store's tiles have no Tractor catalogs with true_class_key in the survey "
                   "roots (" + (", ".join(roots) or "none") + ")") if truth == "auto" else "truth disabled (--truth none)"
            notes.append(f"confusion matrix skipped: {why}")
            parts.append(f'<h2>Confusion matrix</h2><p class="note">Skipped: {html.escape(why)}.</p>')
        else:
            pred = store.read("label", tr.rows).astype(np.int64)
            met = classification_metrics(tr.labels, pred, len(cls.classes))
            accuracy, truth_rows = met["accuracy"], len(tr.rows)
            cm = np.asarray(met["confusion"])
            title = f"{cls.method}: accuracy {met['accuracy']:.3f}, macro-F1 {met['macro_f1']:.3f} (n={met['n']})"
            skipped = (f"<p>Sources whose true class is outside the vocabulary (not counted): "
                       f"{html.escape(', '.join(f'{k}: {v}' for k, v in sorted(tr.skipped.items())))}.</p>"
                       if tr.skipped else "")
            recall = _grid_table(["class", "true sources", "recall"],
                                 [[c, int(cm[i].sum()), "-" if met["per_class_recall"][i] is None
                                   else f"{met['per_class_recall'][i]:.3f}"] for i, c in enumerate(cls.classes)])
            parts.append("<h2>Confusion matrix</h2>" + _kv_table([
                ("truth", tr.source), ("sources with known truth", truth_rows),
                ("accuracy", f"{met['accuracy']:.4f}"), ("macro-F1", f"{met['macro_f1']:.4f}")]) + skipped
                + f'<img class="fig" src="{confusion_png(cm, cls.classes, title)}">' + recall)

    body = "".join(parts)
    note_html = "".join(f'<p class="note">{html.escape(x)}</p>' for x in notes)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>galaxalign report: "
            f"{html.escape(os.path.basename(os.path.normpath(store.path)))}</title><style>{CSS}</style></head><body>"
            f"<h1>Embedding store report</h1><p>{html.escape(os.path.abspath(store.path))} &middot; galaxalign-batch "
            f"{__version__} &middot; {when}</p>{note_html}{body}</body></html>")
    atomic.write_text(out, page)
    return ReportSummary(out, n, cls is not None, truth_rows, accuracy, time.perf_counter() - t0, notes)


def _examples_section(store: EmbeddingStore, cls: Classification, per_class: int, roots: Sequence[str],
                      notes: list[str]) -> str:
    top = top_rows_per_class(store, len(cls.classes), per_class)
    wanted = np.unique(np.concatenate([np.zeros(0, np.int64)] + [r for r in top.values()]))
    cut = store.cutouts(wanted, opener=TileOpener(roots, keep=4))
    orientation = store.cutout_spec.orientation
    missing = sum(v is None for v in cut.values())
    ids = dict(zip(wanted.tolist(), store.read("object_id", wanted).astype(object))) if len(wanted) else {}
    conf = dict(zip(wanted.tolist(), store.read("confidence", wanted).tolist())) if len(wanted) else {}
    links = (dict(zip(wanted.tolist(), (viewer_url(a, b) for a, b in zip(store.read("ra", wanted),
                                                                          store.read("dec", wanted)))))
             if len(wanted) else {})
    html_parts = ["<h2>Examples per class</h2><p>The most confident sources of each class; cutouts re-made "
                  "from the tiles (north up); each id links to the Legacy Survey viewer at its position.</p>"]
    for c, name in enumerate(cls.classes):
        rows = top.get(c, np.zeros(0, np.int64))
        html_parts.append(f"<h3>{html.escape(name)} <small>({html.escape(cls.labels[c])})</small></h3>")
        if not len(rows):
            html_parts.append("<p>no source</p>")
            continue
        cells = []
        for r in rows.tolist():
            pix = cut.get(r)
            img = (f'<img src="{png_base64(to_rgb8(pix, orientation))}">' if pix is not None
                   else '<div class="missing">no tile</div>')
            cells.append(f'<div class="thumb">{img}<br><a href="{html.escape(links[r])}" rel="noopener noreferrer" '
                         f'title="Legacy Survey viewer">{html.escape(str(ids[r]))}</a><br>p={conf[r]:.2f}</div>')
        html_parts.append('<div class="thumbs">' + "".join(cells) + "</div>")
    if missing:
        notes.append(f"{missing} example thumbnail(s) could not be re-made: their tiles were not found "
                     "(pass --survey ROOT for brick tiles)")
    return "".join(html_parts)
