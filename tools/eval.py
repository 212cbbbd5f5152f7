#!/usr/bin/env python3
"""Evaluate a checkpoint (or pretrained weights) on an ImageFolder split: prints top-1, top-5 and images/s.

A ``.safetensors`` file written by ``tools/train.py`` carries its model name, classes and
preprocessing, so ``--checkpoint`` and ``--data-dir`` are enough; flags override. Other
checkpoints (``.pth``, official releases) need ``--model`` (and ``--num-classes`` etc. as
trained). ``--data-dir`` is a root holding ``<split>/<class>/*`` or the split folder itself.

Examples::

    python tools/eval.py --checkpoint output/demo/best.safetensors --data-dir .cache/mnist5k
    python tools/eval.py --model mavit_s --pretrained --data-dir /data/imagenet/val
"""
import argparse
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

from linvision.engine import InputError, evaluate_checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="timm model name (default: from the checkpoint)")
    group.add_argument("--checkpoint", default=None, help=".safetensors or .pth weights")
    group.add_argument("--pretrained", action="store_true", help="use the model's pretrained weights")
    group.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True,
                       help="prefer EMA weights in a .pth checkpoint that has them")
    group.add_argument("--num-classes", type=int, default=None)
    group.add_argument("--in-chans", type=int, default=None)
    group.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="dataset root or split folder")
    group.add_argument("--split", default="val", help="split folder under --data-dir")
    group.add_argument("--img-size", type=int, default=None)
    group.add_argument("--crop-pct", type=float, default=None)
    group.add_argument("--interpolation", default=None)
    group.add_argument("--mean", type=float, nargs="+", default=None)
    group.add_argument("--std", type=float, nargs="+", default=None)
    group.add_argument("--batch-size", "-b", type=int, default=256)
    group.add_argument("--workers", "-j", type=int, default=2)

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bar")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return evaluate_checkpoint(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
