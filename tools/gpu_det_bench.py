#!/usr/bin/env python3
"""GPU acceptance benchmark: torchvision Mask R-CNN training steps, linvision vs ResNet-50 vs Swin-T.

Trains each model for ``--steps`` steps (after ``--warmup`` untimed ones) on synthetic COCO-like
batches (random images, ``--objects`` boxes with box-shaped masks per image) at 800×1333, batch 2,
AdamW, bf16 autocast for forward + losses, and prints one JSON line per model as soon as it is
done, then a JSON summary. Every model runs inside its own try/except, so a failure (OOM, missing
kernel) is reported and the others still run; ``--budget`` seconds stops starting new models.

Models (all random init, all layers trainable, 91 classes, min_size 800 / max_size 1333):
    linvit_s     linvision.adapters.torchvision.maskrcnn("linvit_s") — stages (0,1,2,3) + LN2d output norms + FPN
    resnet50     torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    swin_t       maskrcnn("swin_tiny_patch4_window7_224") — timm Swin-T features_only with
                 strict_img_size=False (timm then pads every window partition and builds the shifted-window
                 masks for the runtime size), img_size=(800, 1344) (the padded batch size), same wrapper

Usage (one GPU, < 5 minutes)::

    python tools/gpu_det_bench.py                       # all three, 20 timed steps each
    python tools/gpu_det_bench.py --models linvit_s --steps 50 --out bench.json

Output fields: ``s_per_step`` (mean wall time of a timed step: forward, loss, backward, optimizer),
``images_per_s``, ``peak_mem_gib`` (torch.cuda.max_memory_allocated over the timed steps),
``params_m``, ``losses`` (the last step's), plus the settings.
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

MODELS = ("linvit_s", "resnet50", "swin_t")


def build(name: str, args) -> torch.nn.Module:
    import torchvision
    from linvision.adapters.torchvision import maskrcnn
    common = dict(num_classes=91, min_size=args.min_size, max_size=args.max_size)
    if name == "resnet50":
        return torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **common)
    if name == "swin_t":
        # The padded batch is a multiple of 32 (GeneralizedRCNNTransform size_divisible=32).
        pad = lambda v: -(-v // 32) * 32  # noqa: E731
        return maskrcnn("swin_tiny_patch4_window7_224", model_kwargs=dict(
            strict_img_size=False, img_size=(pad(args.min_size), pad(args.max_size))), **common)
    return maskrcnn(name, **common)


def synthetic_batch(args, device: torch.device, generator: torch.Generator):
    """``batch`` images ``(3, H, W)`` in [0, 1] and targets with boxes, labels and box-shaped masks."""
    h, w = args.min_size, args.max_size
    images, targets = [], []
    for _ in range(args.batch):
        images.append(torch.rand(3, h, w, generator=generator).to(device))
        n = args.objects
        xy = torch.rand(n, 2, generator=generator) * torch.tensor([w * 0.8, h * 0.8])
        wh = (torch.rand(n, 2, generator=generator) * 0.3 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1 + 1, x0:x1 + 1] = 1
        targets.append(dict(boxes=boxes.to(device), labels=torch.randint(1, 91, (n,), generator=generator).to(device),
                            masks=masks.to(device)))
    return images, targets


def bench_one(name: str, args, device: torch.device) -> Dict:
    result: Dict = dict(model=name, batch=args.batch, size=[args.min_size, args.max_size], dtype=args.dtype,
                        steps=args.steps, warmup=args.warmup)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build(name, args).to(device).train()
    result["build_s"] = round(time.perf_counter() - t0, 2)
    result["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    gen = torch.Generator().manual_seed(0)
    # A few distinct batches, reused round-robin: data generation stays out of the timing.
    batches = [synthetic_batch(args, device, gen) for _ in range(2)]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]

    def step(i: int) -> Dict[str, float]:
        images, targets = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            losses = model(images, targets)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return losses

    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result["warmup_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    for i in range(args.steps):
        losses = step(i)
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    result["s_per_step"] = round(elapsed / args.steps, 4)
    result["images_per_s"] = round(args.batch * args.steps / elapsed, 2)
    result["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None
    result["losses"] = {k: round(float(v.detach()), 4) for k, v in losses.items()}
    result["finite"] = all(torch.isfinite(v).item() for v in losses.values())
    return result


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cuDNN/Triton autotuning)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--min-size", type=int, default=800)
    parser.add_argument("--max-size", type=int, default=1333)
    parser.add_argument("--objects", type=int, default=8, help="boxes/masks per image")
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds; no new model starts after this")
    parser.add_argument("--out", default=None, help="also write the summary JSON here")
    parser.add_argument("--device", default="cuda", help="'cpu' only to smoke-test this script on small sizes")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(json.dumps(dict(error="no CUDA device")), flush=True)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    import timm
    import torchvision

    import linvision
    env = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else str(device), torch=torch.__version__, torchvision=torchvision.__version__,
               timm=timm.__version__, linvision=linvision.__version__)
    print(json.dumps(dict(env=env)), flush=True)

    results = []
    for name in args.models:
        if time.perf_counter() - start > args.budget:
            results.append(dict(model=name, skipped=f"time budget of {args.budget:.0f} s spent"))
            print(json.dumps(results[-1]), flush=True)
            continue
        try:
            res = bench_one(name, args, device)
        except Exception as err:  # keep going: report and run the next model
            res = dict(model=name, error=f"{type(err).__name__}: {err}"[:2000],
                       traceback=traceback.format_exc(limit=6)[-3000:])
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        print(json.dumps(res), flush=True)

    summary = dict(env=env, total_s=round(time.perf_counter() - start, 1), results=results)
    ref = next((r for r in results if r.get("model") == "resnet50" and "s_per_step" in r), None)
    if ref:
        summary["relative_to_resnet50"] = {r["model"]: dict(
            speed=round(ref["s_per_step"] / r["s_per_step"], 3),
            memory=round(r["peak_mem_gib"] / ref["peak_mem_gib"], 3) if ref["peak_mem_gib"] else None)
            for r in results if "s_per_step" in r}
    print(json.dumps(dict(summary=summary), indent=1), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0 if all("s_per_step" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
