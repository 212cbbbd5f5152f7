"""Where a model's GPU time goes: a torch.profiler kernel breakdown by op family.

:func:`profile_model` runs a few warm-up steps, then profiles ``iters`` inference or training steps (the
steps ``tools/benchmark.py`` times) and returns the device time per step grouped two ways: by *family*
(what kind of work the kernel does: linear attention, matmul/1×1 conv, depthwise conv, norm,
activation, elementwise, layout copy, reduction, optimizer, …) and by individual kernel (the top
entries). ``tools/profile_model.py`` prints it as JSON; ``docs/performance.md`` records the results
that guided the model optimisations.
"""
from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

__all__ = ["kernel_family", "profile_model", "FAMILIES"]

# (family, pattern on the lower-cased kernel name), first match wins. Order matters: the Triton
# linear-attention kernels and cuDNN's depthwise kernels before the generic conv/gemm patterns.
FAMILIES: Tuple[Tuple[str, str], ...] = (
    ("linear_attention", r"_state_kernel|_output_kernel|_bwd_|backward_q|backward_kv|linear_attn"),
    # cuDNN names its depthwise kernels after one channel per group in and out: conv2d_c1_k1_nhwc, ...
    ("depthwise_conv", r"depthwise|dwconv|conv_depthwise|dgrad2d_grouped|grouped|c1_k1"),
    ("matmul_or_conv", r"gemm|sm90_xmma|cutlass|nvjet|conv|implicit|wgrad|dgrad|fprop|winograd|cudnn"),
    ("softmax_attention", r"flash|fmha|attention|softmax"),
    ("norm", r"layer_norm|layernorm|batch_norm|batchnorm|bn_fw|bn_bw|welford|rms_norm|group_norm"),
    ("activation", r"gelu|silu|sigmoid|relu|elu|softplus|tanh"),
    ("layout_copy", r"copy|transpose|permute|cat|contiguous|nchw|nhwc|convert|memcpy"),
    ("reduction", r"reduce|sum|mean|norm_kernel|amax|max"),
    ("optimizer", r"adam|foreach|multi_tensor|fused_"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|div|where|fill|pow"),
)


def kernel_family(name: str) -> str:
    """The op family of a CUDA kernel name (``other`` when no pattern matches)."""
    low = name.lower()
    for family, pattern in FAMILIES:
        if re.search(pattern, low):
            return family
    return "other"


def profile_model(model: nn.Module, batch_size: int, img_size: Tuple[int, int], mode: str = "infer", *,
                  iters: int = 5, warmup: int = 3, amp_dtype: Optional[str] = "bfloat16", channels_last: bool = True,
                  top: int = 25) -> Dict[str, Any]:
    """Profile ``iters`` steps of ``model`` on random ``(batch_size, 3, *img_size)`` inputs.

    A step is the one ``tools/benchmark.py`` times (:func:`linvision.benchmark.prepare_infer` /
    :func:`~linvision.benchmark.prepare_train`): an ``inference_mode`` forward, or forward, loss, backward and
    AdamW step, under autocast in ``amp_dtype`` (``"bfloat16"``, ``"float16"`` or None for none), on the
    device of the model's parameters.

    Returns:
        ``{"ms_per_step", "device_ms_per_step", "families": [{family, ms, share}], "kernels":
        [{name, family, ms, calls}]}``, times per step, sorted by time. ``ms_per_step`` is the wall time of an
        unprofiled step; where it is well above ``device_ms_per_step`` the step waits on the host's launches.
        On the CPU the "kernels" are the top-level operators and their CPU time.
    """
    from torch.profiler import ProfilerActivity, profile

    from .benchmark import AMP_DTYPES, PREPARE, Options

    if mode not in PREPARE:
        raise ValueError(f"mode must be one of {sorted(PREPARE)}, got {mode!r}")
    if amp_dtype is not None and amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)} or None, got {amp_dtype!r}")
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    opts = Options(mode=mode, amp=amp_dtype is not None, amp_dtype=amp_dtype or "bfloat16",
                   channels_last=channels_last, warmup=warmup, iters=iters, device=str(device))
    prepared = PREPARE[mode](model, batch_size, tuple(img_size), opts, device)
    try:
        t0 = time.perf_counter()
        for _ in range(iters):
            prepared.step()
        if cuda:
            torch.cuda.synchronize(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / iters
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(iters):
                prepared.step()
            if cuda:
                torch.cuda.synchronize(device)
    finally:
        prepared.close()
    kernels: Dict[str, List[float]] = {}
    for evt in prof.events():
        is_kernel = (evt.device_type == torch.autograd.DeviceType.CUDA) if cuda else (evt.cpu_parent is None)
        if not is_kernel:
            continue
        dur = (evt.device_time if cuda else evt.cpu_time) / 1e3   # µs -> ms
        entry = kernels.setdefault(evt.name, [0.0, 0])
        entry[0] += dur
        entry[1] += 1
    total = sum(v[0] for v in kernels.values()) / iters
    families: Dict[str, float] = {}
    for name, (ms, _) in kernels.items():
        families[kernel_family(name)] = families.get(kernel_family(name), 0.0) + ms / iters
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "ms_per_step": round(wall_ms, 3),
        "device_ms_per_step": round(total, 3),
        "families": [{"family": f, "ms": round(ms, 3), "share": round(ms / total, 4) if total else 0.0}
                     for f, ms in sorted(families.items(), key=lambda kv: -kv[1])],
        "kernels": [{"name": n[:160], "family": kernel_family(n), "ms": round(v[0] / iters, 4),
                     "calls": v[1] // iters} for n, v in ranked],
    }
