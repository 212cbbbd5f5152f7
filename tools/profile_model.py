#!/usr/bin/env python3
"""Profile a model: device time per step by op family and the top kernels, as JSON (CPU: operator times).

    python tools/profile_model.py linvit_s --img-size 224 --batch-size 64 --mode infer --channels-last
    python tools/profile_model.py linvit_b --img-size 1024 --batch-size 4 --mode train

One JSON object per (model, mode) on stdout (see ``linvision.profiling.profile_model``).
"""
import argparse
import json
import sys
from typing import List, Optional

import timm
import torch

import linvision  # noqa: F401  (registers the models)
from linvision.benchmark import model_kwargs, parse_model_kwargs
from linvision.profiling import profile_model


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("models", nargs="+")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--amp-dtype", choices=("bfloat16", "float16", "none"), default="bfloat16")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model-kwargs", nargs="*", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="constructor arguments, for every model or one (values parsed as Python literals)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    h, w = (args.img_size * 2)[:2]
    try:
        extra = parse_model_kwargs(args.model_kwargs)
    except ValueError as e:
        parser.error(str(e))
    amp = None if args.amp_dtype == "none" else args.amp_dtype
    for name in args.models:
        # model_kwargs: the constructor arguments, plus img_size for models built for one input size.
        model = timm.create_model(name, **model_kwargs(name, (h, w), extra)).to(args.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        for mode in (("infer", "train") if args.mode == "both" else (args.mode,)):
            result = profile_model(model, args.batch_size, (h, w), mode, iters=args.iters, warmup=args.warmup,
                                   amp_dtype=amp, channels_last=args.channels_last, top=args.top)
            print(json.dumps({"model": name, "mode": mode, "img_size": [h, w], "batch_size": args.batch_size,
                              "channels_last": args.channels_last, "amp_dtype": args.amp_dtype,
                              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                              "torch": torch.__version__, **result}), flush=True)
        del model
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
