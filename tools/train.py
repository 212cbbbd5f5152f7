#!/usr/bin/env python3
"""Train a timm/linvision model on ImageNet-style data (one process, or many through torchrun).

Data: an ImageFolder tree (``<data-dir>/train/<class>/*``, ``<data-dir>/val/<class>/*``), one tar per
split (``<data-dir>/train.tar``), or a timm source with ``--dataset`` (``wds/...``, ``hfds/...``,
``torch/cifar10``...). Flags follow timm's train.py. ``-c/--config FILE`` loads YAML defaults (keys
are flag names), ``--set KEY=VALUE`` overrides single keys, explicit flags override both; the
resolved config is saved as ``<output>/config.yaml``. The loop lives in :mod:`linvision.engine`;
this script only parses arguments. See docs/training.md.

Examples::

    python tools/train.py -c configs/demo.yaml --data-dir .cache/mnist5k --output output/demo
    torchrun --nproc_per_node=8 tools/train.py -c configs/imagenet/mavit_t.yaml --data-dir /data/imagenet \\
        --output output/mavit_t --resume auto
    python tools/train.py -c configs/imagenet/linvit_t.yaml --data-dir /data/imagenet --set epochs=100 --set batch_size=64
"""
import argparse
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

from linvision.engine import InputError, train
from linvision.training.config import config_dict, parse_args_with_config
from linvision.training.distributed import run_then_destroy_process_group

_BOOL = argparse.BooleanOptionalAction


def _floats(n):
    return dict(type=float, nargs=n, metavar="F")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag defaults")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (YAML value); repeatable")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="linvit_t", help="timm model name")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    group.add_argument("--in-chans", type=int, default=3, help="1 loads images as greyscale")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    group.add_argument("--drop", type=float, default=None, help="dropout before the classifier")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")
    group.add_argument("--grad-checkpointing", action=_BOOL, default=False, help="activation checkpointing per block")
    group.add_argument("--channels-last", action=_BOOL, default=False, help="NHWC memory format")
    group.add_argument("--torchcompile", nargs="?", const="default", default=None, metavar="MODE",
                       help="torch.compile the model (MODE: default, reduce-overhead, max-autotune)")
    group.add_argument("--sync-bn", action=_BOOL, default=False, help="SyncBatchNorm across ranks")
    group.add_argument("--fsdp", action=_BOOL, default=False,
                       help="shard parameters, gradients and optimizer state with FSDP2 (distributed runs)")
    group.add_argument("--model-ema", action=_BOOL, default=False, help="keep (and evaluate) an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-decay-base-size", type=int, default=None,
                       help="raise the decay to the power global_batch/SIZE (the MAViT/RAVLT rule)")
    group.add_argument("--model-ema-warmup", action=_BOOL, default=False, help="ModelEmaV3 decay warmup")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", required=True, help="dataset root (ImageFolder splits, <split>.tar, or a source root)")
    group.add_argument("--dataset", default="", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val")
    group.add_argument("--dataset-download", action=_BOOL, default=False, help="let torch/ sources download")
    group.add_argument("--train-num-samples", type=int, default=None, help="epoch size of an iterable source")
    group.add_argument("--val-num-samples", type=int, default=None)
    group.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction")
    group.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    group.add_argument("--train-interpolation", default=None, help="random-resized-crop interpolation (default: --interpolation)")
    group.add_argument("--mean", **_floats("+"), default=None, help="normalisation mean per channel")
    group.add_argument("--std", **_floats("+"), default=None, help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, default=128, help="per process")
    group.add_argument("--val-batch-size", type=int, default=None, help="default: 2x --batch-size")
    group.add_argument("--workers", "-j", type=int, default=2, help="data-loading processes per rank (0: in the main one)")
    group.add_argument("--prefetcher", action=_BOOL, default=None,
                       help="uint8 batches normalised/erased on the device (default: on for CUDA)")
    group.add_argument("--pin-mem", action=_BOOL, default=None, help="pinned host memory (default: on for CUDA)")

    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="train on resized + centre-cropped images")
    group.add_argument("--scale", **_floats(2), default=[0.08, 1.0], help="random-resized-crop area range")
    group.add_argument("--ratio", **_floats(2), default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--vflip", type=float, default=0.0)
    group.add_argument("--color-jitter", type=float, default=0.4, help="ignored by timm when --aa is set")
    group.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)")
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing fill: const, rand, pixel")
    group.add_argument("--recount", type=int, default=1)
    group.add_argument("--aug-repeats", type=float, default=0, help="repeated augmentation (RepeatAugSampler), e.g. 3")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", **_floats(2), default=None)
    group.add_argument("--mixup-prob", type=float, default=1.0)
    group.add_argument("--mixup-switch-prob", type=float, default=0.5)
    group.add_argument("--mixup-mode", default="batch", help="batch, pair or elem")
    group.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--bce-loss", action=_BOOL, default=False, help="binary cross-entropy instead of softmax CE")
    group.add_argument("--bce-target-thresh", type=float, default=None)

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=300)
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--opt-eps", type=float, default=None)
    group.add_argument("--opt-betas", **_floats("+"), default=None)
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate (null in a config: from --lr-base)")
    group.add_argument("--lr-base", type=float, default=5e-4, help="lr for a global batch of --lr-base-size")
    group.add_argument("--lr-base-size", type=int, default=512)
    group.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt"))
    group.add_argument("--weight-decay", type=float, default=0.05)
    group.add_argument("--momentum", type=float, default=0.9, help="for SGD-style optimizers")
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (group_matcher)")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    group.add_argument("--clip-mode", default="norm", help="norm, value or agc")
    group.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update")
    group.add_argument("--sched", default="cosine", help="timm scheduler name (none: constant lr)")
    group.add_argument("--sched-on-updates", action=_BOOL, default=True,
                       help="step the schedule every update (--no-sched-on-updates: once per epoch)")
    group.add_argument("--warmup-epochs", type=float, default=5)
    group.add_argument("--warmup-lr", type=float, default=1e-6)
    group.add_argument("--min-lr", type=float, default=1e-5)
    group.add_argument("--cooldown-epochs", type=int, default=0)
    group.add_argument("--decay-epochs", type=float, default=None, help="step/wsd schedules")
    group.add_argument("--decay-rate", type=float, default=0.1)

    group = parser.add_argument_group("run")
    group.add_argument("--output", default=None, help="run directory (default: output/train/<model>)")
    group.add_argument("--resume", default=None, help="'auto' (newest intact checkpoint in --output), a run dir or a checkpoint file")
    group.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N updates (0: epoch ends only)")
    group.add_argument("--keep-last", type=int, default=3, help="checkpoint sets kept in <output>/checkpoints")
    group.add_argument("--eval-interval", type=int, default=1, help="evaluate every N epochs (0: last epoch only)")
    group.add_argument("--seed", type=int, default=42)
    group.add_argument("--deterministic", action=_BOOL, default=False, help="torch deterministic algorithms")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--amp", action=_BOOL, default=None, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                       help="float16 adds timm's NativeScaler")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                       help="sync BatchNorm statistics at epoch end (without --sync-bn)")
    group.add_argument("--no-ddp-bb", action="store_true", help="DDP without buffer broadcast")
    group.add_argument("--progress", action=_BOOL, default=True, help="tqdm bars (otherwise log lines)")
    group.add_argument("--log-interval", type=int, default=50, help="steps between progress updates")
    group.add_argument("--tensorboard", action=_BOOL, default=False, help="TensorBoard events (if installed)")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` after loading ``-c/--config`` and ``--set`` defaults (unknown keys are an error)."""
    args = parse_args_with_config(build_parser(), argv)
    if args.output is None:
        args.output = f"output/train/{args.model}"
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser()
    args = parse_args(argv)
    try:
        return train(args, config=config_dict(args, parser))
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_then_destroy_process_group(main)
