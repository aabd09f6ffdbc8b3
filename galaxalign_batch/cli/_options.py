"""The command line's shared vocabulary: one help formatter, one parser class, and the options that
several commands take, each built in one place so that its spelling, choices, default and help are
the same everywhere (``tests/test_cli_consistency.py`` checks it).

The vocabulary (docs/cli.md):

- ``--store STORE.zarr``: the embedding store a command reads or writes.
- ``--tiles PATH ...``: survey tiles: files, folders, globs, ``@list.txt`` or a Legacy Survey root;
  ``--bricks NAME ...`` keeps only those bricks of a survey root (``simulate --bricks N`` is how
  many bricks to make).
- ``--survey ROOT``: a survey root holding a store's tiles, for commands that re-read pixels.
- ``--sources auto|detect|PATH``: where the sources of tiles come from (the Tractor catalogue,
  detection, or one catalogue file); ``--catalog FILE`` is always *your* catalogue (``join``).
- ``--model``: the model (checkpoint, foundation, open_clip spec), ``--device auto|cpu|cuda``.
- ``--address``: a Ray cluster to run on (``auto`` or host:port; default: this machine, as before).
- ``--workers N``: worker processes (``train``, ``pretrain``: Ray Train workers, :func:`add_train_workers`);
  ``--threads N``: threads of this
  process. ``--seed S``, ``--stretch``, ``--force``, ``--force-unlock``, ``--batch-rows``.

A usage error (a required option missing, options that exclude each other) exits with status 2, as
argparse's own; an error found while working exits with 1 (``galaxalign_batch.cli.main``).
"""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.errors import ConfigError
from galaxalign_batch.preprocess.spec import PICTURE_STRETCHES

__all__ = [
    "HelpFormatter", "CommandParser", "UsageError", "add_store", "add_tiles", "add_bricks", "add_survey",
    "add_sources", "add_angular_size", "add_picture_scale", "picture_scale", "add_device", "add_seed", "add_stretch", "add_stretch_augment", "add_force", "add_force_unlock",
    "add_batch_rows", "add_threads", "add_train_workers", "add_resume", "add_address", "loss_weights", "STRETCHES", "DEVICES",
]

DEVICES = ("auto", "cpu", "cuda")
STRETCHES = PICTURE_STRETCHES


def loss_weights(*names: str):
    """An argparse ``type`` for ``len(names)`` non-negative loss weights written ``a,b,c`` (or spaces),
    e.g. ``loss_weights("w_it", "w_is", "w_st")`` for ``train --weights``."""
    spelled = ",".join(names)

    def parse(text: str) -> tuple[float, ...]:
        try:
            w = tuple(float(v) for v in text.replace(",", " ").split())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {len(names)} numbers {spelled}, got {text!r}") from None
        if len(w) != len(names) or any(v < 0 for v in w):
            raise argparse.ArgumentTypeError(f"expected {len(names)} non-negative numbers {spelled}, got {text!r}")
        return w

    parse.__name__ = "weights"  # argparse names the type in its error: "invalid weights value"
    return parse


class UsageError(ConfigError):
    """The options of a command do not go together (exit status 2, like argparse's own usage errors)."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs keep their line breaks; an option's default is appended to its help
    unless the help already speaks of its default or the default is empty (None, False, [])."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default in (None, False, [], (), argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """The parser of every subcommand: :class:`HelpFormatter`, and descriptions dedented."""

    def __init__(self, *args, **kwargs):
        kwargs["formatter_class"] = HelpFormatter
        if kwargs.get("description"):
            kwargs["description"] = textwrap.dedent(kwargs["description"]).strip("\n")
        super().__init__(*args, **kwargs)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new one's ``dest`` and warns once."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        import logging

        logging.getLogger("galaxalign_batch").warning("%s is deprecated: use %s", option_string, self.new)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(p, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` as a hidden, warning spelling of ``new`` (same ``dest``)."""
    p.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, help=argparse.SUPPRESS, **kwargs)


def add_store(p, *, required: bool = True, help: str = "the embedding store") -> argparse.Action:
    return p.add_argument("--store", required=required, metavar="STORE.zarr", help=help)


def add_tiles(p, *, required: bool = False, help: str | None = None) -> argparse.Action:
    return p.add_argument("--tiles", nargs="+", required=required, metavar="PATH",
                          help=help or "tile files, folders, globs, @list.txt, or a Legacy Survey root (folder with coadd/)")


def add_bricks(p) -> argparse.Action:
    return p.add_argument("--bricks", nargs="+", metavar="NAME", help="with a survey root: only these bricks")


def add_survey(p, *, help: str = "survey root(s) holding the store's tiles (repeat for several)") -> argparse.Action:
    return p.add_argument("--survey", action="append", metavar="ROOT", help=help)


def add_sources(p) -> argparse.Action:
    """``--sources`` (the old ``--catalog`` spelling of embed and morphology still works, with a warning)."""
    action = p.add_argument(
        "--sources", default="auto", metavar="auto|detect|PATH",
        help="where the sources of each tile come from: 'auto' (the tile's Tractor catalogue when it has one, "
             "else detection), 'detect' (always detect), or the path of one Tractor catalogue for every tile "
             "(default: auto)")
    add_deprecated_alias(p, "--catalog", "--sources", "sources")
    return action


def add_angular_size(p, *, help: str = "side of a cutout in arcsec: the field of view the model sees") -> argparse.Action:
    return p.add_argument("--angular-size", type=float, default=32.0, metavar="ARCSEC", help=help)


def add_picture_scale(p, *, what: str = "RGB pictures (PNG/JPEG)") -> None:
    """``--pixscale`` / ``--angular-size``: what an already-stretched picture shows (embed's pictures, search's
    picture queries); read back with :func:`picture_scale`."""
    p.add_argument("--pixscale", type=float, metavar="ARCSEC",
                   help=f"{what}: arcsec per pixel of the files; each is cut to the model's field around its centre "
                        "(a CSV column pixscale/pxscale gives it per picture)")
    p.add_argument("--angular-size", type=float, metavar="ARCSEC",
                   help=f"{what}: the arcsec the width of each picture spans. Without --pixscale or --angular-size a "
                        "picture is taken to show the model's field (resized whole)")


def picture_scale(args: argparse.Namespace) -> dict | None:
    """The ``image_scale`` record of :func:`add_picture_scale`'s options (None when neither is given)."""
    from galaxalign_batch.engine.images import scale_record

    if args.pixscale is not None and args.angular_size is not None:
        raise UsageError("give --pixscale or --angular-size, not both")
    for name in ("pixscale", "angular_size"):
        v = getattr(args, name)
        if v is not None and not (v > 0 and v < float("inf")):
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
    if args.pixscale is None and args.angular_size is None:
        return None
    return scale_record(args.pixscale, args.angular_size)


def add_device(p, *, help: str = "where the model runs; auto: a GPU when there is one") -> argparse.Action:
    return p.add_argument("--device", default="auto", choices=DEVICES, help=help)


def add_precision(p, *, default: str | None = "auto",
                  help: str = "the model's forward passes in fp32 or under bf16 autocast; auto (the default): bf16 "
                              "where the hardware runs it natively (a CPU with AVX512-BF16, a GPU with bf16), else "
                              "fp32 (docs/engine.md, 'Precision')") -> argparse.Action:
    from galaxalign_batch.model.precision import CHOICES

    return p.add_argument("--precision", default=default, choices=CHOICES, help=help)


def add_seed(p, *, help: str = "random seed (the same seed gives the same result)") -> argparse.Action:
    return p.add_argument("--seed", type=int, default=0, metavar="S", help=help)


def add_stretch(p, *, default: str | None = "lupton", help: str | None = None) -> argparse.Action:
    return p.add_argument(
        "--stretch", default=default, choices=STRETCHES,
        help=help or "picture stretch: lupton (the Legacy Survey viewer, Galaxy10 DECaLS), asinh, or gz-decals "
                     "(Galaxy Zoo DECaLS: per-band arcsinh with desaturation); docs/preprocess.md")


def _stretch_list(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    if bad := [x for x in names if x not in STRETCHES]:
        raise argparse.ArgumentTypeError(f"{','.join(bad)}: not a stretch (choose from {', '.join(STRETCHES)})")
    return names


def add_stretch_augment(p, *, help: str) -> argparse.Action:
    """``--stretch-augment S[,S]`` (train, pretrain): other stretches the images are also made in."""
    return p.add_argument("--stretch-augment", type=_stretch_list, default=(), metavar="STRETCH[,STRETCH]", help=help)


def add_force(p, *, help: str = "do it again even if the store is up to date") -> argparse.Action:
    return p.add_argument("--force", action="store_true", help=help)


def add_force_unlock(p) -> argparse.Action:
    return p.add_argument("--force-unlock", action="store_true",
                          help="take the output's lock (a store, a training, evaluation, join or restore folder, a survey root) even "
                               "though another run seems to hold it (only when you know that run is gone; a lock whose process died is taken "
                               "over without this)")


def add_batch_rows(p) -> argparse.Action:
    return p.add_argument("--batch-rows", type=int, default=None, metavar="N",
                          help="rows per batch and progress commit (default: one shard of the store)")


def add_threads(p, *, help: str = "torch threads of this process (default: torch's choice)") -> argparse.Action:
    return p.add_argument("--threads", type=int, default=None, metavar="N", help=help)


def add_train_workers(p, *, what: str) -> argparse.Action:
    """``--workers N`` of a training: Ray Train data-parallel workers (0: this process)."""
    return p.add_argument("--workers", type=int, default=0, metavar="N",
                          help=f"Ray Train data-parallel workers, global negatives (0: run in this process); {what}; "
                               "a local Ray instance, or the cluster RAY_ADDRESS names; paths may be relative")


def add_resume(p) -> None:
    r = p.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true", help="require resuming from OUT/checkpoints (default: resume if any)")
    r.add_argument("--no-resume", action="store_true", help="start afresh, deleting OUT/checkpoints")


def add_address(p, *, help: str = "run on a Ray cluster ('auto' or host:port; 'local': a private local Ray "
                                  "instance); default: on this machine without Ray") -> argparse.Action:
    """``--address``: the Ray cluster to join (galaxalign_batch.cluster.init_ray's policy)."""
    return p.add_argument("--address", default=None, help=help)
