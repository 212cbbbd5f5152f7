#!/usr/bin/env python3
"""Whole-model inference and training throughput, peak memory and MACs of timm models (linvision's and
timm's) over resolutions and batch sizes; one JSON line per case on stdout, a summary table on stderr.
The logic and the output fields are documented in ``linvision/benchmark.py``.

    python tools/benchmark.py linvit_s swin_tiny_patch4_window7_224 --img-size 224 --batch-size 64 \\
        --compare swin_tiny_patch4_window7_224
    python tools/benchmark.py linvit_b vit_base_patch16_224 --batch-size 1024:4 2048:1 \\
        --compare vit_base_patch16_224 --plot speed.png --out speed.jsonl
    python tools/benchmark.py linvit_s --img-size 224 512 1024 --batch-size 1 --mode infer --cold-start
    python tools/benchmark.py --plot-from speed.jsonl speed.png
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from linvision.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
