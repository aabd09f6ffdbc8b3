"""`galaxalign-batch fewshot`: few-shot heads on frozen embeddings."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch fewshot --store sky.zarr --labels rings.csv --out rings.head.safetensors
  galaxalign-batch fewshot --store sky.zarr --labels rings.csv --out rings.head.safetensors --kind mlp --apply
  galaxalign-batch fewshot --store sky.zarr --labels votes.csv --out ring.head --classes ring,"not ring"
  galaxalign-batch fewshot --store sky.zarr --head rings.head.safetensors --apply     # an existing head
"""


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def validation_line(head) -> str:
    from galaxalign_batch.fewshot import CV_MIN_PER_CLASS

    v = head.validation
    if not v:
        return (f"validation: none (fewer than {CV_MIN_PER_CLASS} labels in some class); probabilities are the "
                "regularised head's own (not temperature-calibrated)")
    cal = f"temperature {v['temperature']:.3f}" if v.get("calibrated") else "not calibrated (fewer than 20 labels)"
    return (f"validation ({v['method']}, {v['n']} labels): accuracy {_fmt(v['accuracy'])}, balanced accuracy "
            f"{_fmt(v['balanced_accuracy'])}, AUC {_fmt(v['auc'])}, log loss {_fmt(v['log_loss'])}, "
            f"ECE {_fmt(v['ece'])}; {cal}")


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.store import open_readable
    from galaxalign_batch.fewshot import apply as ap

    if bool(args.labels) == bool(args.head):
        raise opt.UsageError("fewshot needs either --labels CSV (with --out HEAD) to fit a head, or --head HEAD to apply one")
    if args.labels and not args.out:
        raise opt.UsageError("fewshot --labels needs --out HEAD (the head file to write)")
    if args.head and (args.out or args.classes or args.kind_given):
        raise opt.UsageError("--head applies an existing head: --out, --classes and --kind do not apply")
    name = ap.check_name(args.name) if args.name else None
    store = open_readable(args.store)
    if args.apply or args.head:  # a writer: one per store, refused before any work (docs/store.md)
        from galaxalign_batch.lease import locked

        with locked(args.store, args.force_unlock):
            return _run(args, store, name)
    return _run(args, store, name)


def _run(args: argparse.Namespace, store, name) -> int:
    from galaxalign_batch.fewshot import apply as ap
    from galaxalign_batch.fewshot import fit_head, load_head
    from galaxalign_batch.fewshot.labels import check_embeddings, embeddings_at, read_labels, rows_of

    check_embeddings(store)

    if args.head:
        head = load_head(args.head)
        ap.check_head_fits(head, store)
        head_file = args.head
        print(f"head {args.head}: {head.kind}, classes {head.classes}, fitted on {head.n_labels} labels")
        print(validation_line(head))
    else:
        classes = [c for c in args.classes.split(",")] if args.classes else None
        labels = read_labels(args.labels, classes)
        rows = rows_of(store, labels.object_ids, what=str(args.labels))
        X = embeddings_at(store, rows)
        head = fit_head(X, labels.y, labels.classes, kind=args.kind, seed=args.seed,
                        source={**ap.store_source(store), "labels": str(args.labels)})
        head_file = str(head.save(args.out))
        width = max(len(c) for c in labels.classes)
        print(f"{head_file}: {head.kind} head on {len(labels.y)} labels, {len(labels.classes)} classes")
        for c, n in labels.counts().items():
            print(f"  {c:<{width}}  {n:>7d}")
        if labels.dropped:
            print("  ignored (not in --classes): " + ", ".join(f"{k!r} {n}" for k, n in sorted(labels.dropped.items())))
        print(validation_line(head))
    if args.apply or args.head:
        summary = ap.apply_head(args.store, head, name or ap.head_name(head_file), head_file=head_file,
                                batch_rows=args.batch_rows, force=args.force, force_unlock=args.force_unlock,
                                address=args.address)
        for line in summary.lines():
            print(line)
    return 0


class _KindAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.kind_given = True


def register(sub) -> None:
    p = sub.add_parser(
        "fewshot", help="fit a few-shot head (linear probe / small MLP) on a store's embeddings from a label file",
        description=textwrap.dedent("""\
            Fit a calibrated few-shot head on the frozen embeddings of the labelled objects of a store
            (labels.csv: header with object_id,label; other columns ignored; any class set, e.g. ring / not
            ring) and save it to one file. Prints the classes, their counts and a cross-validated estimate.
            With --apply, also writes the head's probabilities for every row into the store
            (fewshot/NAME/{probs,label,confidence}; resumable, beside classify's arrays). See docs/fewshot.md."""),
        epilog=EXAMPLES)
    opt.add_store(p)
    p.add_argument("--labels", metavar="CSV", help="label file with columns object_id,label")
    p.add_argument("--out", metavar="HEAD", help="head file to write (safetensors + JSON metadata)")
    p.add_argument("--head", metavar="HEAD", help="apply this existing head file instead of fitting one")
    p.add_argument("--kind", default="linear", choices=["linear", "mlp"], action=_KindAction,
                   help="linear probe (L2 logistic regression) or one-hidden-layer MLP (default: linear)")
    p.add_argument("--classes", metavar="A,B,...",
                   help="the classes, in this order (default: every label, sorted); rows with other labels are ignored")
    opt.add_seed(p, help="seed of the cross-validation folds and the MLP")
    p.add_argument("--apply", action="store_true", help="write the head's probabilities for every row into the store")
    p.add_argument("--name", help="name of the head in the store (default: the head file's name without suffix)")
    opt.add_batch_rows(p)
    opt.add_force(p, help="apply again even if the store is up to date")
    opt.add_force_unlock(p)
    opt.add_address(p, help="with --apply/--head: compute the row batches as Ray tasks on this cluster ('auto' or "
                            "host:port; 'local': a private local Ray instance); default: here")
    p.set_defaults(func=run, kind_given=False)
