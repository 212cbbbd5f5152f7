#!/usr/bin/env python3
"""Train a timm/linvision model on an ImageFolder tree (``<data-dir>/train/<class>/*``, ``<data-dir>/val/<class>/*``).

Flags follow timm's train.py. A YAML file given with ``-c/--config`` sets defaults (keys are the
flag names with underscores); flags on the command line override it. The loop lives in
:mod:`linvision.engine`; this script only parses arguments.

Examples::

    python tools/train.py --model linvit_t --data-dir /data/imagenet --batch-size 256 --epochs 300
    python tools/train.py -c configs/demo.yaml --data-dir .cache/mnist5k --output output/demo
    python tools/train.py -c configs/demo.yaml --data-dir .cache/mnist5k --output output/demo --resume auto
"""
import argparse
import sys
from typing import List, Optional

import yaml
from timm.utils import ParseKwargs

from linvision.engine import InputError, train


def _floats(n: int):
    return dict(type=float, nargs=n, metavar="F")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag defaults")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="linvit_t", help="timm model name")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--num-classes", type=int, default=None, help="default: number of class folders")
    group.add_argument("--in-chans", type=int, default=3, help="1 loads images as greyscale")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="root with train/ and val/ ImageFolder splits")
    group.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction")
    group.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    group.add_argument("--mean", **_floats("+"), default=None, help="normalisation mean per channel")
    group.add_argument("--std", **_floats("+"), default=None, help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, default=128)
    group.add_argument("--val-batch-size", type=int, default=None, help="default: 2x --batch-size")
    group.add_argument("--workers", "-j", type=int, default=2, help="data-loading processes (0: in the main one)")

    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="train on resized + centre-cropped images")
    group.add_argument("--scale", **_floats(2), default=[0.08, 1.0], help="random-resized-crop area range")
    group.add_argument("--ratio", **_floats(2), default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--color-jitter", type=float, default=0.4)
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--lr", type=float, default=1e-3)
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--momentum", type=float, default=0.9, help="for SGD-style optimizers")
    group.add_argument("--clip-grad", type=float, default=None, help="max gradient norm")
    group.add_argument("--sched", default="cosine", help="timm scheduler name (stepped every update)")
    group.add_argument("--warmup-epochs", type=float, default=5)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)

    group = parser.add_argument_group("run")
    group.add_argument("--output", default=None, help="checkpoint directory (default: output/train/<model>)")
    group.add_argument("--resume", default=None, help="last_state.pth / output dir to resume, or 'auto'")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm bars")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` after loading ``-c/--config`` YAML defaults (unknown keys are an error)."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("-c", "--config", default=None)
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                cfg = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            parser.error(f"cannot read config {known.config}: {e}")
        if not isinstance(cfg, dict):
            parser.error(f"{known.config}: expected a mapping of flag names to values")
        cfg = {str(k).replace("-", "_"): v for k, v in cfg.items()}
        actions = {a.dest: a for a in parser._actions}
        unknown = sorted(set(cfg) - set(actions))
        if unknown:
            parser.error(f"{known.config}: unknown keys {unknown}")
        parser.set_defaults(**cfg)
        for dest in cfg:
            actions[dest].required = False  # a config may provide --data-dir
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = f"output/train/{args.model}"
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
