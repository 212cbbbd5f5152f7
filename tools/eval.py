#!/usr/bin/env python3
"""Evaluate a checkpoint, registry weights or --pretrained on a folder, tar or timm source: top-1, top-5, images/s.

A ``.safetensors`` file written by ``tools/train.py`` carries its model name, classes and
preprocessing, so ``--checkpoint`` and ``--data-dir`` are enough; flags override. ``--use-ema``
takes the EMA weights (``X.ema.safetensors`` beside a linvision checkpoint, the ``model_ema`` /
``state_dict_ema`` entry of a ``.pth``). Every file is read without running code from it and
checked against the manifest beside it, if any. Other checkpoints (``.pth``, official releases, converted
by the model family's filter) need ``--model`` (and ``--num-classes`` etc. as trained).
``--data-dir`` is a root holding ``<split>/<class>/*`` (or ``<split>.tar``), the split folder or
tar itself, or the root of a ``--dataset`` source. Under torchrun every process evaluates a share.
A CUDA out-of-memory error halves the batch size and retries.

Examples::

    python tools/eval.py --checkpoint output/demo/best.safetensors --data-dir .cache/mnist5k
    python tools/eval.py --checkpoint output/mavit_t/last.safetensors --use-ema --data-dir /data/imagenet
    python tools/eval.py --model mavit_s --pretrained --data-dir /data/imagenet/val
    torchrun --nproc_per_node=8 tools/eval.py --model mavit_s --checkpoint MAViT_S.pth --data-dir /data/imagenet
"""
import argparse
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

from linvision.engine import InputError, evaluate_checkpoint
from linvision.training.distributed import run_then_destroy_process_group

_BOOL = argparse.BooleanOptionalAction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="timm model name, optionally with a weight tag (default: from the checkpoint)")
    group.add_argument("--checkpoint", default=None, help=".safetensors / .pth weights, or a checkpoint manifest .json")
    group.add_argument("--pretrained", action="store_true", help="use the model's registry (pretrained) weights")
    group.add_argument("--use-ema", action=_BOOL, default=None,
                       help="EMA weights (default: the file given; for a container holding both, the model family's documented choice)")
    group.add_argument("--num-classes", type=int, default=None)
    group.add_argument("--in-chans", type=int, default=None)
    group.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="dataset root, split folder or .tar")
    group.add_argument("--dataset", default="", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--split", default="val", help="split under --data-dir")
    group.add_argument("--num-samples", type=int, default=None, help="size of an iterable source's split")
    group.add_argument("--img-size", type=int, default=None)
    group.add_argument("--crop-pct", type=float, default=None)
    group.add_argument("--interpolation", default=None)
    group.add_argument("--mean", type=float, nargs="+", default=None)
    group.add_argument("--std", type=float, nargs="+", default=None)
    group.add_argument("--batch-size", "-b", type=int, default=256, help="halved automatically on out-of-memory")
    group.add_argument("--workers", "-j", type=int, default=2)
    group.add_argument("--prefetcher", action=_BOOL, default=None, help="default: on for CUDA")
    group.add_argument("--pin-mem", action=_BOOL, default=None)

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--amp", action=_BOOL, default=None, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"))
    group.add_argument("--channels-last", action=_BOOL, default=False)
    group.add_argument("--torchcompile", nargs="?", const="default", default=None, metavar="MODE")
    group.add_argument("--dist-backend", default=None)
    group.add_argument("--progress", action=_BOOL, default=True, help="tqdm bar")
    return parser


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return evaluate_checkpoint(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_then_destroy_process_group(main)
