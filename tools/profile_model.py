#!/usr/bin/env python3
"""Profile a model on the GPU: device time per step by op family and the top kernels, as JSON.

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
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model-kwargs", nargs="*", default=[], help="k=v passed to create_model (ints/floats/bools parsed)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    h, w = (args.img_size * 2)[:2]
    amp = None if args.amp_dtype == "none" else getattr(torch, args.amp_dtype)
    kwargs = {}
    for kv in args.model_kwargs:
        k, v = kv.split("=", 1)
        for cast in (int, float, {"True": True, "False": False}.__getitem__):
            try:
                v = cast(v)
                break
            except (ValueError, KeyError):
                pass
        kwargs[k] = v
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    for name in args.models:
        model = timm.create_model(name, **kwargs).to(args.device, memory_format=fmt)
        x = torch.randn(args.batch_size, 3, h, w, device=args.device).to(memory_format=fmt)
        for mode in (("infer", "train") if args.mode == "both" else (args.mode,)):
            result = profile_model(model, x, mode=mode, iters=args.iters, amp_dtype=amp, top=args.top)
            print(json.dumps({"model": name, "mode": mode, "img_size": [h, w], "batch_size": args.batch_size,
                              "channels_last": args.channels_last, "amp_dtype": args.amp_dtype,
                              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                              "torch": torch.__version__, **result}), flush=True)
        del model, x
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
