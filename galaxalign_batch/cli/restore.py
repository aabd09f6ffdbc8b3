"""`galaxalign-batch restore`: the denoising head applied to survey tiles, written as FITS cubes."""

from __future__ import annotations

import argparse
import textwrap

from galaxalign_batch.cli import _options as opt

EXAMPLES = """\
examples:
  galaxalign-batch restore --tiles runs/sky --bricks 1501p022 --model denoiser.safetensors --out restored/
  galaxalign-batch restore --tiles 'cutouts/*.fits' --model denoiser.safetensors --out restored/ --device cuda
  galaxalign-batch cutout --tiles restored/1501p022-restored.fits --ra 150.12 --dec 2.25 --out galaxy.png
"""


def run(args: argparse.Namespace) -> int:
    from galaxalign_batch.model.inputs import resolve_device
    from galaxalign_batch.restoration.tiles import restore_tiles

    if args.bricks and not args.tiles:
        raise opt.UsageError("--bricks selects bricks of a --tiles survey root")
    summary = restore_tiles(args.tiles, args.model, args.out, bricks=args.bricks,
                            device=str(resolve_device(args.device)), window=args.window, margin=args.margin,
                            batch_size=args.batch_size, force=args.force, force_unlock=args.force_unlock,
                            precision=args.precision)
    for line in summary.lines():
        print(line)
    return 3 if summary.failed else 0


def register(sub) -> None:
    p = sub.add_parser(
        "restore", help="denoise survey tiles with a denoising head (docs/restoration.md)",
        description=textwrap.dedent("""\
            Apply a denoising head (a file written by galaxalign_batch.restoration.save_head, e.g. by
            bench/denoise.py --save-heads) to every tile of --tiles: the tile is restored in overlapping
            windows of --window px (the head's training stamps), each with its own noise level (the median
            1/sqrt(invvar) of the window for bricks, a wavelet estimate of the whole tile for cubes without
            inverse variance) and, for a head with foundation features, its own encoder cutout; only each
            window's core (--margin px in from inner borders) is kept. Writes OUT/<brick or file>-restored.fits:
            a (g, r, z) cube in nanomaggies with the tile's WCS (NaN without coverage), readable as a tile by
            embed and cutout. Tiles already restored by this head file, --window and --margin are skipped
            (--force redoes them), tiles restored otherwise are restored again; a tile that fails is listed
            and the others go on (exit status 3)."""),
        epilog=EXAMPLES)
    opt.add_tiles(p, required=True)
    opt.add_bricks(p)
    p.add_argument("--model", required=True, metavar="HEAD.safetensors", help="the denoising head file")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--window", type=int, default=128, metavar="PX", help="window side in pixels")
    p.add_argument("--margin", type=int, default=16, metavar="PX", help="pixels of each window's inner borders not kept")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="windows per forward pass")
    opt.add_device(p)
    opt.add_precision(p, help="the head's forward passes in fp32 or under bf16 autocast; auto (the default): bf16 where "
                              "the hardware runs it natively (a CPU with AVX512-BF16, a GPU with bf16), else fp32 "
                              "(docs/restoration.md)")
    opt.add_force(p, help="restore tiles again even if their output exists")
    opt.add_force_unlock(p)
    p.set_defaults(func=run)
