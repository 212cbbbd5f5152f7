#!/usr/bin/env python3
"""Train a timm/linvision model on ImageNet-style data (one process, or many through torchrun).

Data: an ImageFolder tree (``<data-dir>/train/<class>/*``, ``<data-dir>/val/<class>/*``), one tar per
split (``<data-dir>/train.tar``), or a timm source with ``--dataset`` (``wds/...``, ``hfds/...``,
``torch/cifar10``...). Flags follow timm's train.py. ``-c/--config FILE`` loads YAML defaults (keys
are flag names), ``--set KEY=VALUE`` overrides single keys, explicit flags override both; the
resolved config is saved as ``<output>/config.yaml``. Parser, config and loop live in
:mod:`linvision.training` (``cli``, ``config``, ``trainer``). See docs/training.md.

Examples::

    python tools/train.py -c configs/demo.yaml --data-dir .cache/mnist5k --output output/demo
    torchrun --nproc_per_node=8 tools/train.py -c configs/imagenet/mavit_t.yaml --data-dir /data/imagenet \\
        --output output/mavit_t --resume auto
    python tools/train.py -c configs/imagenet/linvit_t.yaml --data-dir /data/imagenet --set epochs=100 --set batch_size=64
"""
from linvision.training.cli import build_train_parser as build_parser  # noqa: F401  (for scripts that load this file)
from linvision.training.cli import parse_train_args as parse_args  # noqa: F401
from linvision.training.cli import train_main as main
from linvision.training.distributed import run_then_destroy_process_group

if __name__ == "__main__":
    run_then_destroy_process_group(main)
