"""`galaxalign-batch label`: human-in-the-loop labelling in the browser."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import textwrap

from galaxalign_batch.cli import _options as opt

log = logging.getLogger("galaxalign_batch")

EXAMPLES = """\
examples:
  galaxalign-batch label --store sky.zarr --task rings --classes ring,not-ring
  galaxalign-batch label --store sky.zarr --task morph                 # classes: the store's vocabulary
  galaxalign-batch label --store sky.zarr --task rings --host 0.0.0.0 --port 8765   # prints a URL with a token
  galaxalign-batch label --store sky.zarr --task rings --export rings.csv         # then: fewshot --labels rings.csv
"""


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.errors import ConfigError
    from galaxalign_batch.labelling.task import TaskPaths, build_app, open_db, open_embedding_store, parse_classes

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which SIMD build it loads is noise here
    classes = parse_classes(args.classes)
    paths = TaskPaths.for_task(args.store, args.task, args.db)
    if args.export:
        store = open_embedding_store(args.store)
        db = open_db(args.store, args.task, classes, args.db, must_exist=True, store=store)
        n = db.export_csv(args.export)
        db.close()
        print(f"{n} label(s) of task {args.task!r} written to {args.export}")
        return 0
    if args.retrain_every < 1 or args.min_per_class < 1:
        raise ConfigError("--retrain-every and --min-per-class must be at least 1")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: 0 (any free port) to 65535 expected")
    from galaxalign_batch.labelling.server import is_loopback, make_server, new_token, serve

    token = None if is_loopback(args.host) else new_token()
    app = build_app(args.store, args.task, classes, db=args.db, roots=args.survey, token=token,
                    retrain_every=args.retrain_every, head_kind=args.kind, min_per_class=args.min_per_class,
                    lease_s=60.0 * args.lease_minutes, n_clusters=args.clusters, seed=args.seed)
    server, url = make_server(app, args.host, args.port)
    app.warm_up()
    app.trainer.start()
    counts = app.db.counts()
    print(f"labelling task {args.task!r} ({', '.join(app.db.classes)}) on {app.store.path} "
          f"({app.store.n_rows} rows, {sum(counts.values())} labelled so far; database {paths.db})")
    if token:
        print(f"bound to {args.host}: requests need the token in this URL")
    print(f"open {url}   (Ctrl-C to stop; every label is saved when given)", flush=True)
    sys.stdout.flush()
    if args.open:
        import webbrowser

        webbrowser.open(url)
    def terminate(signum, frame):  # SIGTERM stops like Ctrl-C (labels are committed already either way)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        serve(server, app)
    except KeyboardInterrupt:
        print("stopped", flush=True)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "label", help="human-in-the-loop labelling in the browser",
        description=textwrap.dedent("""\
            Serve a local web page to label the galaxies of an embedding store for a task of your own
            (e.g. ring / not-ring). It shows first a spread of the store (k-means clusters of the
            embeddings), then the galaxies the current few-shot head is least sure about; the head
            retrains in the background every few labels. Keys: 1-9 classes, n not sure, a artefact,
            u/Backspace undo. Labels are kept in SQLite beside the store (STORE.labels/TASK.sqlite),
            each committed before the page moves on. Bound to 127.0.0.1 by default; bound to another
            address, a random token is required (it is in the printed URL). --export writes
            object_id,label for 'galaxalign-batch fewshot --labels' and exits."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    p.add_argument("--task", required=True, metavar="NAME", help="the labelling task (one database per task)")
    p.add_argument("--classes", metavar="A,B,...",
                   help="the task's classes, comma separated (a new task; default: the store's vocabulary; an "
                        "existing task keeps its classes)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other needs the token)")
    p.add_argument("--port", type=int, default=0, help="port (default 0: any free port; the URL is printed)")
    p.add_argument("--db", metavar="PATH.sqlite", help="the label database (default STORE.labels/TASK.sqlite)")
    p.add_argument("--export", metavar="LABELS.csv", help="write object_id,label of the task's class labels and exit")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    opt.add_survey(p)
    p.add_argument("--retrain-every", type=int, default=5, metavar="N",
                   help="retrain the head after N new labels, marks or undos (default 5)")
    p.add_argument("--kind", default="linear", choices=["linear", "mlp"], help="few-shot head kind, as fewshot --kind (default linear)")
    opt.add_deprecated_alias(p, "--head", "--kind", "kind", choices=["linear", "mlp"])
    p.add_argument("--min-per-class", type=int, default=2, metavar="N",
                   help="labels a class needs before the head uses it (default 2; the first head needs two classes)")
    p.add_argument("--lease-minutes", type=float, default=10.0,
                   help="how long the galaxies a tab shows are kept from other tabs (default 10)")
    p.add_argument("--clusters", type=int, metavar="K", help="k-means clusters of the first round (default ~sqrt(N)/2, 2-100)")
    opt.add_seed(p, help="seed of the clustering and the head")
    p.set_defaults(func=run)
