#!/usr/bin/env python3
"""Train (or test) an mmdet 3.x / mmseg 1.x config from configs/mmdet or configs/mmseg with mmengine's Runner.

The config's ``default_scope`` (``mmdet`` or ``mmseg``) selects the toolbox; both need full mmcv
2.1.0 (its compiled ops), which the package index ships only as source — see docs/dense.md.
Without them this tool stops with the install steps instead of a traceback.

Examples::

    python tools/train_dense.py configs/mmdet/mask-rcnn_ravlt-t_fpn_1x_coco.py --work-dir work_dirs/mrcnn_t
    torchrun --nproc-per-node 8 tools/train_dense.py configs/mmseg/upernet_ravlt-s_160k_ade20k-512x512.py \\
        --launcher pytorch --amp
    python tools/train_dense.py CONFIG --cfg-options model.backbone.init_cfg=None train_dataloader.batch_size=1
    python tools/train_dense.py CONFIG --test --checkpoint work_dirs/x/epoch_12.pth
    python tools/train_dense.py CONFIG --test --official-checkpoint maskrcnn_t_1x_12_epoch.pth
"""
import argparse
import importlib
import importlib.util
import os
import os.path as osp
import sys
from typing import List, Optional

INSTALL_STEPS = """\
{what}

mmdet 3.3.0 / mmsegmentation 1.2.2 need full mmcv 2.1.0 (compiled ops); mmcv-lite lacks them and
mmcv 2.2.0 is rejected by both. The package index has only mmcv's source, so build it once
(about 30 minutes on 2 cores; docs/dense.md, "Installing mmdet / mmseg"):

    pip install "setuptools<81" wheel ninja
    pip download --no-deps --no-binary :all: mmcv==2.1.0 && tar xzf mmcv-2.1.0.tar.gz
    sed -i 's/-std=c++17/-std=c++20/' mmcv-2.1.0/setup.py      # torch >= 2.14 needs C++20
    MMCV_WITH_OPS=1 MAX_JOBS=2 pip install --no-build-isolation ./mmcv-2.1.0
    pip install mmdet==3.3.0 mmsegmentation==1.2.2 ftfy regex
"""


def build_parser() -> argparse.ArgumentParser:
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="an mmdet/mmseg config file (configs/mmdet/*.py, configs/mmseg/*.py)")
    parser.add_argument("--work-dir", default=None, help="default: work_dirs/<config name>")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, default={}, metavar="KEY=VALUE",
                        help="override config entries, e.g. model.backbone.frozen_stages=1 (mmengine DictAction)")
    parser.add_argument("--amp", dest="amp", action="store_true", default=None,
                        help="force mixed precision (AmpOptimWrapper; the configs already use it where upstream did)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="train in fp32")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from the latest checkpoint of --work-dir, or from a given file")
    parser.add_argument("--test", action="store_true", help="evaluate instead of training (runner.test())")
    parser.add_argument("--checkpoint", default=None, help="weights for --test (sets load_from)")
    parser.add_argument("--official-checkpoint", default=None, metavar="PATH",
                        help="an official MALA/RALA mmdet/mmseg checkpoint to start from (or --test): its backbone "
                             "is converted by LinVisionBackbone (init_cfg, prefix 'backbone.'), the neck and heads "
                             "load through load_from")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local-rank", "--local_rank", type=int, default=0)
    return parser


def _scope(cfg) -> str:
    scope = cfg.get("default_scope")
    if scope not in ("mmdet", "mmseg"):
        raise SystemExit(f"error: {cfg.filename}: default_scope must be 'mmdet' or 'mmseg', got {scope!r}")
    return scope


def check_toolbox(scope: str) -> Optional[str]:
    """``None`` if ``scope`` (mmdet/mmseg) and full mmcv import, else the message naming the install steps."""
    if importlib.util.find_spec(scope) is None:
        return INSTALL_STEPS.format(what=f"error: {scope} is not installed.")
    try:
        importlib.import_module("mmcv.ops")
        importlib.import_module(f"{scope}.models")
    except Exception as err:  # ImportError, mmcv's version assertion, missing mmcv._ext ...
        return INSTALL_STEPS.format(what=f"error: cannot import {scope}.models: {type(err).__name__}: {err}")
    return None


def _fp32_optim_wrapper(optim_wrapper) -> None:
    if optim_wrapper.get("type") == "AmpOptimWrapper":
        optim_wrapper["type"] = "OptimWrapper"
        for key in ("loss_scale", "dtype", "use_fsdp"):
            optim_wrapper.pop(key, None)


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(args.local_rank)

    from mmengine.config import Config

    if not osp.isfile(args.config):
        print(f"error: config file not found: {args.config}", file=sys.stderr)
        return 2
    cfg = Config.fromfile(args.config)  # imports linvision.adapters.mm through custom_imports
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    scope = _scope(cfg)
    problem = check_toolbox(scope)
    if problem:
        print(problem, file=sys.stderr)
        return 1

    import torch

    from linvision.serialization import allow_plain_data_in_torch_load
    cfg.launcher = args.launcher
    cfg.work_dir = args.work_dir or cfg.get("work_dir") or osp.join("work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.amp and torch.cuda.is_available():
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    elif args.amp is False:
        _fp32_optim_wrapper(cfg.optim_wrapper)
    elif not torch.cuda.is_available() and cfg.optim_wrapper.get("type") == "AmpOptimWrapper":
        print("note: no CUDA device and mmengine's AmpOptimWrapper needs one: training in fp32", file=sys.stderr)
        _fp32_optim_wrapper(cfg.optim_wrapper)
    if args.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif args.resume:
        cfg.resume, cfg.load_from = True, args.resume
    if args.checkpoint:
        cfg.load_from = args.checkpoint
    # mmengine reads checkpoints (load_from, resume, official files) with torch.load(weights_only=True);
    # their meta holds numpy values and message-hub buffers: allow exactly those plain-data types.
    allow_plain_data_in_torch_load()
    if args.official_checkpoint:
        cfg.model.backbone.init_cfg = dict(type="Pretrained", checkpoint=args.official_checkpoint, prefix="backbone.")
        cfg.load_from = args.official_checkpoint

    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner
    runner = Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
    if args.test:
        if args.official_checkpoint:
            # Runner.test() does not run init_weights (train() does); the backbone needs its converter.
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            model.backbone.init_weights()
        runner.test()
    else:
        runner.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
