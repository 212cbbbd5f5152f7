"""Benchmark the linear-attention core: Triton kernels vs the PyTorch reference, its torch.compile, and SDPA.

Prints one JSON object per (shape, options) line, then a summary table. Times in microseconds:

* ``{path}_fwd_us`` / ``{path}_fwdbwd_us`` — median of ``triton.testing.do_bench`` for each path called
  from Python as a user would (host overhead included); paths: ``triton``, ``eager`` (the reference
  ``linear_attention_torch``), ``compiled`` (``torch.compile`` of it), ``sdpa`` (softmax attention);
* ``triton_graph_*_us`` — the Triton path replayed from a CUDA graph inside ``do_bench`` (device time);
* ``triton_graph_clean_*_us`` — the same graph timed with L2 evicted by *reading* 256 MB before each
  call. ``do_bench`` evicts L2 by *writing* 256 MB (``zero_``), which leaves ~50 MB of dirty lines that
  the timed call then pays to write back — about 16 µs at 3 TB/s, a large share of a 17 µs op;
* ``floor_*_bytes`` — minimum HBM traffic: forward reads q, k, v and writes out once; backward reads
  q, k, v, dout and writes dq, dk, dv once (the fp32 state, d·dv per head, is not counted);
* ``floor_*_us`` — those bytes at the measured copy bandwidth (a 1 GiB ``copy_``, read + write bytes);
  ``copy_same_bytes_*_us`` — a ``copy_`` moving exactly the floor's bytes, in the same harnesses;
* ``*_frac_copy_bw`` — ``floor_us / time`` (1.0 = at the copy floor; the forward target is ≥ 0.75);
* ``rel_err_{out,dq,dk,dv}`` — ``max|triton − ref| / max|ref|`` against the fp32 reference, run after the
  timings so with the configs the autotuner picked for this shape; ``value_check`` pass/FAIL (the exit
  status is 1 if any row, or the fp16 overflow check, fails).

Run on a GPU: ``python tools/benchmark_attn.py [--no-compile] [--no-sdpa] [--out results.json]``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from linvision.attn.core import linear_attention
from linvision.attn.ops.naive import linear_attention_torch
from linvision.benchmark import capture_graph, time_clean
from linvision.attn.rope import RopeGrid, rope_angle
from linvision.checkpoint import atomic_write

SHAPES = [(8, 4, 3136, 64), (2, 4, 50176, 64), (32, 3, 3136, 32), (2048, 3, 196, 32), (1, 1, 262144, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench(fn: Callable[[], object], rep: int = 100) -> float:
    """Median time of ``fn`` in microseconds (``triton.testing.do_bench``)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    n = 1 << 29                                    # 1 GiB of bf16
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * n * 2 / (t * 1e-6)


def bench_clean(fn: Callable[[], object], rep_ms: float = 100.0) -> float:
    """Median time of ``fn`` in µs with L2 evicted before each call by reading 256 MB (no dirty lines)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    reps = max(10, min(1000, int(rep_ms / max(start.elapsed_time(end) / 5, 1e-3))))
    return time_clean(fn, reps) * 1e3


def capture(fn: Callable[[], object]) -> Optional[Callable[[], None]]:
    """Capture one call of ``fn`` in a CUDA graph; returns its ``replay`` (None if capture fails)."""
    try:
        return capture_graph(fn, warmup=3).replay
    except Exception as exc:  # noqa: BLE001 - report, do not abort the sweep
        print(f"# graph capture failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def copy_same_bytes(nbytes: int) -> Dict[str, float]:
    """A device-to-device copy that reads + writes ``nbytes`` in total, in both harnesses."""
    src = torch.randn(nbytes // 4, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    return {"do_bench": bench(lambda: dst.copy_(src)), "clean": bench_clean(lambda: dst.copy_(src))}


def traffic(b: int, h: int, n: int, d: int, dv: int, esize: int, weights: bool) -> Dict[str, int]:
    tokens = b * h * n
    fwd = tokens * esize * (2 * d + 2 * dv) + (tokens * 4 if weights else 0)
    bwd = tokens * esize * (4 * d + 3 * dv) + (tokens * 8 if weights else 0)
    return {"floor_fwd_bytes": fwd, "floor_fwdbwd_bytes": fwd + bwd}


# Bound on max|triton − ref| / max|ref| (twice the tests' elementwise rtol: the tests allow rtol·|ref| + rtol·max|ref|).
CHECK_TOL = {torch.bfloat16: 4e-2, torch.float16: 1e-2, torch.float32: 2e-4}


def value_check(triton_fn: Callable, reference_fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                g: torch.Tensor) -> Dict[str, object]:
    """The timed Triton path (with the configs the autotuner picked for this shape) against the fp32 reference:
    ``max|triton − ref| / max|ref|`` for out, dq, dk, dv, and ``value_check`` = pass/FAIL against ``CHECK_TOL``."""
    tri_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = triton_fn(*tri_in)
    tri = [out] + list(torch.autograd.grad(out, tri_in, g))
    ref_out = reference_fn(*ref_in)
    ref = [ref_out] + list(torch.autograd.grad(ref_out, ref_in, g.float()))
    errs = {name: ((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
            for name, a, b in zip(("out", "dq", "dk", "dv"), tri, ref)}
    ok = all(e <= CHECK_TOL[q.dtype] for e in errs.values())
    return {**{f"rel_err_{name}": e for name, e in errs.items()}, "value_check": "pass" if ok else "FAIL"}


def run_case(b: int, h: int, n: int, d: int, dtype: torch.dtype, normalization: str, feature_map: str,
             rope: bool, copy_bw: float, compiled: Dict[str, Callable], use_compile: bool,
             skip_sdpa: bool) -> Dict[str, object]:
    dev = torch.device("cuda")
    side = math.isqrt(n)
    grid = RopeGrid(rope_angle(d).to(dev), side, n // side) if rope else None
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype) for _ in range(3))
    g = torch.randn(b, h, n, d, device=dev, dtype=dtype)
    scale = d ** -0.5
    opts = dict(normalization=normalization, feature_map=feature_map, scale=scale, rope=grid)

    def triton_fn(q, k, v):
        return linear_attention(q, k, v, backend="triton", **opts)

    def eager_fn(q, k, v):
        return linear_attention_torch(q, k, v, **opts)

    def sdpa_fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    paths = {"triton": triton_fn, "eager": eager_fn}
    if use_compile:
        paths["compiled"] = lambda q, k, v: compiled["ref"](q, k, v, **opts)
    if not skip_sdpa:
        paths["sdpa"] = sdpa_fn

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))

    def fwdbwd(fn):
        def step():
            out = fn(qg, kg, vg)
            torch.autograd.grad(out, (qg, kg, vg), g)
        return step

    row: Dict[str, object] = {"B": b, "H": h, "N": n, "d": d, "dtype": str(dtype).replace("torch.", ""),
                              "normalization": normalization, "feature_map": feature_map, "rope": rope}
    row.update(traffic(b, h, n, d, d, torch.finfo(dtype).bits // 8, False))
    for name, fn in paths.items():
        with torch.no_grad():
            row[f"{name}_fwd_us"] = bench(lambda: fn(q, k, v))
        row[f"{name}_fwdbwd_us"] = bench(fwdbwd(fn))
    with torch.no_grad():
        replay_fwd = capture(lambda: triton_fn(q, k, v))
    replay_fwdbwd = capture(fwdbwd(triton_fn))
    for kind, replay in (("fwd", replay_fwd), ("fwdbwd", replay_fwdbwd)):
        row[f"triton_graph_{kind}_us"] = bench(replay) if replay else None
        row[f"triton_graph_clean_{kind}_us"] = bench_clean(replay) if replay else None
        same = copy_same_bytes(row[f"floor_{kind}_bytes"])
        row[f"copy_same_bytes_{kind}_us"] = same["do_bench"]
        row[f"copy_same_bytes_clean_{kind}_us"] = same["clean"]

    row.update(value_check(triton_fn, eager_fn, q, k, v, g))

    for kind in ("fwd", "fwdbwd"):
        floor_us = row[f"floor_{kind}_bytes"] / copy_bw * 1e6
        row[f"floor_{kind}_us"] = floor_us
        for path in ("triton", "triton_graph", "triton_graph_clean"):
            t = row.get(f"{path}_{kind}_us")
            row[f"{path}_{kind}_frac_copy_bw"] = floor_us / t if t else None
        row[f"speedup_vs_eager_{kind}"] = row[f"eager_{kind}_us"] / row[f"triton_{kind}_us"]
    return row


def fp16_overflow_check(n: int = 262144, d: int = 64) -> Dict[str, object]:
    """Unit-variance fp16 q, k, v at N tokens: are forward and backward finite for every normalisation?"""
    dev = torch.device("cuda")
    side = math.isqrt(n)
    grid = RopeGrid(rope_angle(d).to(dev), side, n // side)
    result = {}
    for normalization in ("division", "magnitude_aware", "injective", "none"):
        q, k, v = (torch.randn(1, 1, n, d, device=dev, dtype=torch.float16, requires_grad=True) for _ in range(3))
        out = linear_attention(q, k, v, normalization=normalization, feature_map="elu1", scale=d ** -0.5, rope=grid,
                               backend="triton")
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
        result[normalization] = bool(all(torch.isfinite(t).all() for t in (out, dq, dk, dv)))
    return {"fp16_finite_N": n, **result}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd reference")
    parser.add_argument("--no-sdpa", action="store_true", help="skip SDPA (slow at N = 262144)")
    parser.add_argument("--shapes", default=None, help="B,H,N,d;B,H,N,d;... (default: the five standard shapes)")
    parser.add_argument("--out", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark_attn needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[args.dtype]
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";")]
    dev = torch.device("cuda")
    copy_bw = copy_bandwidth(dev)
    header = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
              "copy_bandwidth_GBps": copy_bw / 1e9, "command": " ".join(["python"] + sys.argv)}
    print(json.dumps(header), flush=True)
    compiled = {"ref": torch.compile(linear_attention_torch)} if not args.no_compile else {}

    cases = [(s, "division", "elu1", False) for s in shapes]
    cases.append((shapes[0], "magnitude_aware", "elu1", True))
    rows = []
    for (b, h, n, d), normalization, feature_map, rope in cases:
        row = run_case(b, h, n, d, dtype, normalization, feature_map, rope, copy_bw, compiled,
                       use_compile=not args.no_compile, skip_sdpa=args.no_sdpa)
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    check = fp16_overflow_check()
    print(json.dumps(check), flush=True)

    cols = ["triton", "triton_graph", "triton_graph_clean", "eager", "compiled", "sdpa"]
    heads = ["triton", "graph", "graph clean", "eager", "compile", "sdpa"]
    print("\n| B,H,N,d | options | " + " | ".join(f"{c} fwd" for c in heads) + " | floor fwd | "
          + " | ".join(f"{c} f+b" for c in heads) + " | floor f+b | fwd frac (triton/graph/clean) | "
          "f+b frac (triton/graph/clean) | × eager f+b |")
    print("|" + "---|" * (2 * len(cols) + 7))
    for r in rows:
        def fmt(key, spec=".1f"):
            val = r.get(key)
            return "-" if val is None else format(val, spec)
        name = f"{r['B']},{r['H']},{r['N']},{r['d']}"
        opts = r["normalization"] + "+" + r["feature_map"] + ("+rope" if r["rope"] else "")
        fwd = " | ".join(fmt(f"{c}_fwd_us") for c in cols)
        fb = " | ".join(fmt(f"{c}_fwdbwd_us") for c in cols)
        fracs = ["/".join(fmt(f"{p}_{kind}_frac_copy_bw", ".2f")
                          for p in ("triton", "triton_graph", "triton_graph_clean")) for kind in ("fwd", "fwdbwd")]
        print(f"| {name} | {opts} | {fwd} | {r['floor_fwd_us']:.1f} | {fb} | {r['floor_fwdbwd_us']:.1f} | "
              f"{fracs[0]} | {fracs[1]} | {r['speedup_vs_eager_fwdbwd']:.1f} |")
    failed = [f"{r['B']},{r['H']},{r['N']},{r['d']} {r['normalization']}" for r in rows if r["value_check"] != "pass"]
    if args.out:
        payload = json.dumps({"header": header, "rows": rows, "fp16_check": check}, indent=1)
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(payload))
    if failed or not all(v for key, v in check.items() if key != "fp16_finite_N"):
        print(f"error: value check failed for {failed or 'the fp16 overflow check'} (rel_err_* above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
