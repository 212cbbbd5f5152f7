"""``tune``: benchmark the Triton kernels' configs for one model at one input size, and keep them on disk.

Without tuning, a kernel runs a built-in default config (or one tuned earlier and cached on disk), so a
model's first forward at a new size costs compiles only. ``tune(model, x)`` runs one forward and
backward with tuning on: every kernel key those calls meet that has no cached config is benchmarked,
and the winners are written to the cache (``linvision.attn.ops.autotune`` says where and how), where
every later process finds them::

    import linvision, timm, torch
    model = timm.create_model("linvit_b").cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):          # the dtype you will run with
        linvision.attn.tune(model, torch.randn(64, 3, 224, 224, device="cuda"))

The token-count class of each attention call (N ≤ 1024 / ≤ 8192 / ≤ 65536 / more) and the head dims pick
the configs, not the exact size: tuning at one resolution covers the sizes whose stages fall in the same
classes.
"""
from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

__all__ = ["tune"]


def _floating_tensors(out: Any):
    if isinstance(out, torch.Tensor):
        if out.is_floating_point():
            yield out
    elif isinstance(out, dict):
        for value in out.values():
            yield from _floating_tensors(value)
    elif isinstance(out, (list, tuple)):
        for value in out:
            yield from _floating_tensors(value)


def tune(model: nn.Module, example_input: Any, backward: bool = True, retune: bool = False) -> Dict[str, Any]:
    """Run ``model(example_input)`` (and a backward through every floating output, without touching the
    parameters' ``.grad``) with the Triton kernels in ``tune`` mode; the tuned configs go to the on-disk cache
    and stay in use in this process.

    Args:
        model: on the GPU, in the mode (train/eval) and under the autocast it will run with (the argument
            dtypes are part of each kernel's key).
        example_input: a tensor ``(B, 3, H, W)``, or a tuple of positional inputs.
        backward: also tune the backward kernels.
        retune: benchmark keys that are cached already too (and overwrite their entries).

    Returns:
        ``{"tuned": n, "cached": n, "default": n, "fixed": n, "cache": path}``: how many kernel configs the
        call chose, by where they came from, and the cache file.
    """
    from .ops import autotune   # imports Triton: linvision itself does not

    before = dict(autotune.STATS)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with autotune.tuning(retune=retune):
        if backward:
            out = model(*inputs)
            roots = [t for t in _floating_tensors(out) if t.requires_grad]
            params = [p for p in model.parameters() if p.requires_grad]
            if roots and params:
                loss = sum(t.float().sum() for t in roots)
                torch.autograd.grad(loss, params, allow_unused=True)
        else:
            with torch.no_grad():
                model(*inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    counts = {k: autotune.STATS[k] - before.get(k, 0) for k in autotune.STATS}
    return {**counts, "cache": str(autotune.cache_path())}
