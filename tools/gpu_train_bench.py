#!/usr/bin/env python3
"""GPU acceptance benchmark of the training loop: a short linvit_t run on generated JPEGs, printing JSON.

Writes an ImageFolder of synthetic 224x224 JPEGs (default 2,000 train images in 10 classes, each
class a colour and stripe pattern under noise, plus 500 val images) into a temporary directory, then
runs ``tools/train.py`` on it for about ``--steps`` optimizer updates with bf16 autocast,
channels_last and ``torch.compile`` (all switchable), evaluates once at the end, and prints one JSON
object (rank 0) with the training throughput (median over epochs after the first two, which hold
the compilation), the peak CUDA memory of every rank and the final val top-1.

Run it as is on one GPU and through torchrun on several; the scaling efficiency is
``img_per_sec(N GPUs) / (N * img_per_sec(1 GPU))`` at the same per-GPU batch::

    python tools/gpu_train_bench.py
    torchrun --nproc_per_node=2 tools/gpu_train_bench.py
    python tools/gpu_train_bench.py --device cpu --img-size 64 --images 64 --batch-size 8 --steps 8 --no-compile --no-amp

Throughput is end to end (the data loaders decode and augment the JPEGs on the CPU with
``--workers`` processes per rank); ``loader_workers`` in the JSON says how many.
"""
import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import numpy as np

from linvision.training.cli import train_main
from linvision.training.distributed import run_then_destroy_process_group

ROOT = Path(__file__).resolve().parents[1]


def make_images(root: Path, num_train: int, num_val: int, num_classes: int, size: int, seed: int = 0) -> None:
    """``root/{train,val}/class_XX/*.jpg``: a per-class base colour and stripe frequency, random
    phase, position jitter and noise, so the task is learnable but not trivial."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32) / size
    colours = rng.uniform(40, 215, size=(num_classes, 3))
    for split, count in (("train", num_train), ("val", num_val)):
        for i in range(count):
            c = i % num_classes
            folder = root / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            freq = 2 + 2 * c
            angle = rng.uniform(0, np.pi)
            wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
            img = colours[c] + 35 * wave[..., None] + rng.normal(0, 25, size=(size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)


def main(argv: Optional[List[str]] = None) -> Optional[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="linvit_t")
    parser.add_argument("--images", type=int, default=2000, help="train images (val: a quarter, at most 500)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128, help="per GPU")
    parser.add_argument("--steps", type=int, default=300, help="optimizer updates, rounded up to whole epochs")
    parser.add_argument("--workers", type=int, default=None, help="loader processes per rank (default: cores/ranks - 1, at most 12)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 instead of DDP (several GPUs)")
    parser.add_argument("--workdir", default=None, help="where to put data and output (default: a temp dir, removed)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more tools/train.py flags")
    opts = parser.parse_args(argv)

    import torch
    from linvision.training.distributed import init_distributed

    start = time.perf_counter()
    env = init_distributed(opts.device)
    world = env.world_size
    workdir = None
    if env.is_primary:
        workdir = opts.workdir or tempfile.mkdtemp(prefix="linvision_bench_")
        data = Path(workdir) / "data"
        if not (data / "val").is_dir():
            make_images(data, opts.images, min(500, max(opts.classes, opts.images // 4)), opts.classes, opts.img_size)
    workdir = env.broadcast_object(workdir)
    env.barrier()
    data_s = time.perf_counter() - start

    steps_per_epoch = max(1, opts.images // (opts.batch_size * world))
    epochs = max(3, -(-opts.steps // steps_per_epoch))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = opts.workers if opts.workers is not None else max(1, min(12, cores // world - 1))
    argv_train = [
        "--data-dir", str(Path(workdir) / "data"), "--output", str(Path(workdir) / "run"),
        "--model", opts.model, "--img-size", str(opts.img_size), "--batch-size", str(opts.batch_size),
        "--epochs", str(epochs), "--warmup-epochs", "1", "--lr", "1e-3", "--weight-decay", "0.05",
        "--drop-path", "0.1", "--smoothing", "0.1", "--workers", str(workers), "--eval-interval", "0",
        "--keep-last", "1", "--no-progress", "--log-interval", "100000", "--seed", "0",
        "--amp" if opts.amp else "--no-amp", "--amp-dtype", "bfloat16",
        "--channels-last" if opts.channels_last else "--no-channels-last",
    ] + (["--torchcompile"] if opts.compile else []) + (["--fsdp"] if opts.fsdp else []) \
        + (["--device", opts.device] if opts.device else []) + list(opts.extra)
    result = train_main(argv_train)

    peaks = env.gather_objects(result["peak_mem_mb"])
    rates = [row["img_per_sec"] for row in result["history"]]
    steady = rates[2:] if len(rates) > 3 else rates[1:] or rates
    report = {
        "model": opts.model, "world_size": world,
        "device": torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else str(env.device),
        "batch_per_gpu": opts.batch_size, "global_batch": opts.batch_size * world, "img_size": opts.img_size,
        "train_images": opts.images, "epochs": epochs, "steps": result["num_updates"],
        "amp": "bfloat16" if opts.amp else None, "channels_last": opts.channels_last, "compile": opts.compile,
        "parallel": "fsdp" if opts.fsdp and world > 1 else ("ddp" if world > 1 else "single"),
        "loader_workers": workers,
        "img_per_sec": float(np.median(steady)), "img_per_sec_per_gpu": float(np.median(steady)) / world,
        "epoch_img_per_sec": [round(r, 1) for r in rates],
        "first_epoch_s": result["history"][0]["time"],
        "peak_mem_gib_per_rank": [round(p / 1024, 3) for p in peaks],
        "val_top1": (result["last"] or {}).get("top1"),
        "data_gen_s": round(data_s, 1), "total_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    env.barrier()
    if env.is_primary:
        print(json.dumps(report, indent=1))
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


if __name__ == "__main__":
    run_then_destroy_process_group(main)
