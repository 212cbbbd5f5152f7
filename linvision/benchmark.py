"""Whole-model speed and memory: inference and training throughput of timm models (linvision's and timm's)
over resolutions and batch sizes, printed as JSON lines (``tools/benchmark.py`` is the command line).

A *case* is (model, resolution, batch size, mode). For each one the benchmark prints one JSON object:

* ``kind`` ``"case"``; ``status`` ``"ok"``, ``"oom"`` (out of memory: the sweep frees the memory and goes
  on) or ``"error"`` (any other failure of that case, ``error`` holding its one-line message);
* ``model``, ``img_size`` ``[H, W]``, ``batch_size``, ``mode`` (``"infer"`` or ``"train"``);
* ``img_per_s`` (``batch_size`` / the median time of one call), ``ms_median``, ``ms_min``, ``ms_max``,
  ``reps`` (timed calls, after ``warmup`` untimed ones); ``tflops`` (2 · MACs · img/s, forward only for
  ``infer``, 3× that for ``train``: the usual backward ≈ 2× forward estimate);
* with ``rounds`` > 1: ``round_medians_ms``, the median of each round. Every model of a resolution is then
  kept on the device and the timed calls of a case alternate between the models in that many rounds, so
  a drift of the host's speed (which bounds small-batch eager calls) falls on all of them alike;
* ``peak_mem_mib``: the model's own peak over the case (``torch.cuda.max_memory_allocated`` above what was
  allocated before, plus its weights and what the case keeps: input, optimizer state, graph pool; models
  kept alongside are not counted), null on CPU;
* ``params``, ``gmacs`` (per image at this resolution, ``linvision.complexity.model_complexity``, counted
  once per model and resolution under a fake-tensor mode: no compute, any resolution);
* ``compile_s`` (with ``compile``: the wall time of the first call, which compiles), ``cuda_graph``;
* with a reference model (``compare``): ``ref_model``, ``ref_img_per_s``, ``speedup_vs_ref`` (this model's
  img/s over the reference's in the same case, measured in the same process) and ``mem_vs_ref``;
* ``device``, ``torch``, ``timm``, ``triton``, ``linvision``, ``cuda``, ``triton_autotune`` (how the Triton
  kernels choose configs: ``default``, ``tune`` or ``fixed``, see ``linvision.attn.ops.autotune``; with
  ``LINVISION_TRITON_AUTOTUNE=1`` the warm-up calls tune any kernel key not cached yet) and ``options``
  (every option of the run).

Inference runs under ``torch.inference_mode``; a training step is forward, cross-entropy loss on random
labels, backward, AdamW step and ``zero_grad(set_to_none=True)`` (a ``GradScaler`` for float16). Both run
under autocast (bfloat16 by default) unless ``amp`` is off. Times come from CUDA events around each call
(``time.perf_counter`` on CPU); the median of the timed calls is reported. With ``cuda_graph`` (inference)
the call is captured in a CUDA graph after the warm-up and its replays are timed.

The device timers are public for the other benchmarks (``tools/benchmark_attn.py``): :func:`capture_graph`,
:func:`time_clean` (L2 evicted by a read before each call) and :func:`replay_time` (both together).

``cold_start`` adds one ``kind: "cold_start"`` object per model and resolution, before that model's first
case there: ``first_forward_s`` (wall time of the first inference call in this process, Triton compiles
and any tuning included), ``first_train_step_s`` (the first training step, when training is measured) and
``triton_configs`` (how many kernel configs those calls chose: default / cached / tuned / fixed, see
``linvision.attn.ops.autotune``). Kernels compiled for an earlier model or resolution of the same process
are not compiled again, so the first model of a run is the cold one; Triton's own compile cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``) also carries over between processes.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Options", "parse_img_size", "plan_cases", "resolve_models", "model_kwargs", "run", "plot",
           "read_jsonl", "summary", "main", "capture_graph", "time_clean", "replay_time", "Prepared",
           "prepare_infer", "prepare_train"]

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("infer", "train")


@dataclasses.dataclass
class Options:
    """Settings of a run (every field is echoed in each output line's ``options``)."""
    mode: str = "both"                    # "infer", "train" or "both"
    amp: bool = True
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    compile: bool = False
    cuda_graph: bool = False              # inference only
    grad_checkpointing: bool = False      # training only
    warmup: int = 3
    iters: int = 10                       # timed calls (at most, with time_budget)
    rounds: int = 1                       # > 1: the models of a resolution alternate, timed calls split over rounds
    time_budget: Optional[float] = None   # seconds of timed calls per case
    device: str = "cuda"
    cold_start: bool = False
    compare: Optional[str] = None
    model_kwargs: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

    def modes(self) -> Tuple[str, ...]:
        return MODES if self.mode == "both" else (self.mode,)


# ---------------------------------------------------------------------------------------------
# What to run
# ---------------------------------------------------------------------------------------------

def parse_img_size(text: str) -> Tuple[int, int]:
    """``"224"`` -> ``(224, 224)``; ``"768x1024"`` -> ``(768, 1024)`` (height x width)."""
    parts = str(text).lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"image size must be N or HxW, got {text!r}") from None
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError(f"image size must be N or HxW with positive sides, got {text!r}")
    return (sizes[0], sizes[-1])


def plan_cases(img_sizes: Sequence[str], batch_sizes: Sequence[str]) -> List[Tuple[Tuple[int, int], int]]:
    """The (resolution, batch) pairs to run, resolution-major.

    ``batch_sizes`` are either plain numbers (every resolution × every batch size) or ``RES:BATCH`` pairs
    (``224:64 1024:4 2048:1``: the given batch at the given resolution; ``img_sizes`` then may be empty,
    else each of its sizes needs a pair)."""
    pairs = [b for b in batch_sizes if ":" in str(b)]
    if pairs and len(pairs) != len(batch_sizes):
        raise ValueError("batch sizes must be all numbers or all RES:BATCH pairs, not a mix")
    if not pairs:
        if not img_sizes:
            raise ValueError("give at least one image size (--img-size)")
        return [(parse_img_size(s), _positive_int(b, "batch size")) for s in img_sizes for b in batch_sizes]
    cases = []
    for pair in pairs:
        size, batch = str(pair).split(":", 1)
        cases.append((parse_img_size(size), _positive_int(batch, "batch size")))
    listed = {parse_img_size(s) for s in img_sizes}
    missing = listed - {size for size, _ in cases}
    if missing:
        raise ValueError(f"no RES:BATCH pair for image size {'x'.join(map(str, sorted(missing)[0]))}")
    return [case for case in cases if not listed or case[0] in listed]


def _positive_int(text, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} must be a positive integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return value


def resolve_models(names: Sequence[str], timm_pattern: Optional[str] = None) -> List[str]:
    """Model names in order, without repeats: each name as given, or the timm models matching it when it
    holds a wildcard (``linvit_*``), then the models matching ``timm_pattern``."""
    import timm
    import linvision  # noqa: F401  (registers linvision's models with timm)
    out: List[str] = []
    for name in names:
        matched = timm.list_models(name) if any(c in name for c in "*?[") else [name]
        if not matched:
            raise ValueError(f"no timm model matches {name!r}")
        out += matched
    if timm_pattern:
        matched = timm.list_models(timm_pattern)
        if not matched:
            raise ValueError(f"no timm model matches {timm_pattern!r}")
        out += matched
    return list(dict.fromkeys(out))


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """``["drop_path_rate=0.1", "vit_base_patch16_224:dynamic_img_size=True"]`` -> ``{"*": {...}, name: {...}}``
    (values parsed as Python literals, else kept as strings)."""
    import ast
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        target, _, assignment = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("*", "", item)
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"model kwargs are [MODEL:]KEY=VALUE, got {item!r}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        out.setdefault(target or "*", {})[key] = parsed
    return out


def model_kwargs(name: str, size: Tuple[int, int], extra: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Constructor kwargs of ``name`` at ``size``: the user's (``"*"`` for every model, then the model's
    own), plus ``img_size=(H, W)`` for a model whose pretrained config has a fixed input size of another
    size (timm's ViT, Swin; linvision's models take any size) unless the user set ``img_size`` or
    ``dynamic_img_size``."""
    from timm.models import get_pretrained_cfg
    kwargs = {**extra.get("*", {}), **extra.get(name, {})}
    if "img_size" in kwargs or kwargs.get("dynamic_img_size"):
        return kwargs
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=True)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if cfg is not None and getattr(cfg, "fixed_input_size", False) and tuple(cfg.input_size[1:]) != tuple(size):
        kwargs["img_size"] = tuple(size)
    return kwargs


def build_model(name: str, size: Tuple[int, int], extra: Dict[str, Dict[str, Any]]) -> nn.Module:
    """``timm.create_model(name, pretrained=False, **model_kwargs(...))`` on the CPU (random weights)."""
    import timm
    import linvision  # noqa: F401
    return timm.create_model(name, pretrained=False, **model_kwargs(name, size, extra))


def complexity(model: nn.Module, size: Tuple[int, int]) -> Dict[str, Any]:
    """``{"params", "gmacs"}`` of a CPU model for one image at ``size``: ``model_complexity`` run on fake
    tensors (shapes only, so any resolution costs seconds); ``gmacs`` null with ``gmacs_error`` if that fails."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from linvision.complexity import model_complexity
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            return model_complexity(model, (3, *size))
    except Exception as e:  # noqa: BLE001 - a model the flop counter cannot trace still gets timed
        return {"params": sum(p.numel() for p in model.parameters()), "gmacs": None, "gmacs_error": one_line(e)}


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()
    message = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return message if len(message) <= limit else message[:limit - 1] + "…"


def is_oom(exc: BaseException) -> bool:
    """Whether an exception means the device ran out of memory (PyTorch's, or an allocator message)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "cublas_status_alloc_failed" in text)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(opts: Options, device: torch.device):
    # Autocast's weight-cast cache must be off while a CUDA graph is captured (its casts would be
    # captured once and then reused as stale tensors).
    return torch.autocast(device.type, dtype=AMP_DTYPES[opts.amp_dtype], enabled=opts.amp,
                          cache_enabled=not opts.cuda_graph)


def time_calls(fn: Callable[[], object], reps: int, device: torch.device) -> List[float]:
    """Milliseconds of each of ``reps`` calls of ``fn``: CUDA events around each call on the GPU (the device
    timeline: the call's kernels, and any wait for the host between them), ``perf_counter`` on the CPU."""
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def capture_graph(fn: Callable[[], object], warmup: int = 1) -> "torch.cuda.CUDAGraph":
    """``fn`` run ``warmup`` times on a side stream (compiles, settles the allocator), then captured in a CUDA
    graph; ``graph.replay()`` repeats its kernels with no host work."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def time_clean(fn: Callable[[], object], reps: int) -> float:
    """Median time (ms, CUDA events; the lower middle one for even ``reps``, as ``torch.median``) of ``reps`` calls
    of ``fn``, L2 evicted before each by reading 256 MB: a read leaves no dirty lines for the timed call to write
    back, as ``do_bench``'s ``zero_()`` does (about 16 µs at 3 TB/s, a large share of the attention passes)."""
    flush = torch.empty(64 << 20, dtype=torch.int32, device=torch.cuda.current_device())
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.max()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[(len(times) - 1) // 2]


def replay_time(fn: Callable[[], object], reps: int = 25) -> float:
    """Median device time (ms) of ``fn`` replayed from a CUDA graph with L2 clean (:func:`time_clean`). The graph
    keeps host time out: calls that run for tens of µs take about as long to launch from the host, so events
    around eager calls would time the host. (The Triton kernels' tuner ranks configs the same way.)"""
    return time_clean(capture_graph(fn).replay, reps)


@dataclasses.dataclass
class Prepared:
    """A model made ready for one case (built by :func:`prepare_infer` / :func:`prepare_train`, warm-up
    done): ``step()`` is one timed call, ``reps`` how many calls to time, ``extra`` fields for the output
    line (``compile_s``), ``close()`` releases what the case holds (optimizer state, grad checkpointing)."""
    step: Callable[[], object]
    reps: int
    extra: Dict[str, Any]
    close: Callable[[], None] = lambda: None


def _warm_up(step: Callable[[], object], opts: Options, device: torch.device) -> int:
    """Warm-up calls (untimed); returns how many calls to time: ``iters``, or fewer when ``time_budget``
    (seconds) at the warm-up's pace is shorter."""
    t0 = time.perf_counter()
    for _ in range(opts.warmup):
        step()
    _sync(device)
    per_call = (time.perf_counter() - t0) / max(opts.warmup, 1)
    if opts.time_budget is not None and opts.warmup:
        return max(1, min(opts.iters, int(opts.time_budget / max(per_call, 1e-6))))
    return opts.iters


def _summarise(times: List[float], batch: int) -> Dict[str, Any]:
    median = statistics.median(times)
    return {"img_per_s": batch / (median / 1e3), "ms_median": median, "ms_min": min(times), "ms_max": max(times),
            "reps": len(times)}


def _loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for ``(B, classes)`` logits; otherwise the sum of the floating outputs' means."""
    if isinstance(out, torch.Tensor) and out.dim() == 2:
        return F.cross_entropy(out.float(), target % out.shape[1])
    tensors = [out] if isinstance(out, torch.Tensor) else list(out.values() if isinstance(out, dict) else out)
    return sum(t.float().mean() for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def _input(batch: int, size: Tuple[int, int], opts: Options, device: torch.device) -> torch.Tensor:
    x = torch.randn(batch, 3, *size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if opts.channels_last else x


def _compiled(model: nn.Module, opts: Options):
    return torch.compile(model, dynamic=False) if opts.compile else model


def prepare_infer(model: nn.Module, batch: int, size: Tuple[int, int], opts: Options,
                  device: torch.device) -> Prepared:
    """Inference calls of ``model`` (already on ``device``) at one batch size and resolution: compiled or
    captured in a CUDA graph as ``opts`` says, warmed up."""
    model.eval()
    x = _input(batch, size, opts, device)
    fn = _compiled(model, opts)
    extra: Dict[str, Any] = {}

    def call():
        with torch.inference_mode(), _autocast(opts, device):
            return fn(x)
    if opts.compile:
        t0 = time.perf_counter()
        call()
        _sync(device)
        extra["compile_s"] = time.perf_counter() - t0
    step = call
    if opts.cuda_graph and device.type == "cuda":
        for _ in range(opts.warmup):
            call()
        step = capture_graph(call, warmup=1).replay
    return Prepared(step, _warm_up(step, opts, device), extra)


def prepare_train(model: nn.Module, batch: int, size: Tuple[int, int], opts: Options,
                  device: torch.device) -> Prepared:
    """Training steps (forward, loss, backward, AdamW step, grads set to None) of ``model``, warmed up."""
    model.train()
    if opts.grad_checkpointing:
        model.set_grad_checkpointing(True)
    x = _input(batch, size, opts, device)
    target = torch.randint(0, 1000, (batch,), device=device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, weight_decay=0.05)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.amp and opts.amp_dtype == "float16")
    fn = _compiled(model, opts)

    def step():
        with _autocast(opts, device):
            loss = _loss(fn(x), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def close():
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        if opts.grad_checkpointing:
            model.set_grad_checkpointing(False)
    extra: Dict[str, Any] = {}
    try:
        if opts.compile:
            t0 = time.perf_counter()
            step()
            _sync(device)
            extra["compile_s"] = time.perf_counter() - t0
        reps = _warm_up(step, opts, device)
    except BaseException:
        close()
        raise
    return Prepared(step, reps, extra, close)


PREPARE = {"infer": prepare_infer, "train": prepare_train}


def _triton_stats() -> Optional[Dict[str, int]]:
    # Only when the kernels were used: importing the ops would import Triton.
    module = sys.modules.get("linvision.attn.ops.autotune")
    return dict(module.STATS) if module is not None else None


def cold_start(model: nn.Module, batch: int, size: Tuple[int, int], opts: Options,
               device: torch.device) -> Dict[str, Any]:
    """Wall times of the first inference call (and the first training step) of ``model`` at ``size`` in this
    process, and the kernel configs they chose."""
    before = _triton_stats() or {}
    x = _input(batch, size, opts, device)
    out: Dict[str, Any] = {}
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode(), _autocast(opts, device):
        model(x)
    _sync(device)
    out["first_forward_s"] = time.perf_counter() - t0
    if "train" in opts.modes():
        model.train()
        t0 = time.perf_counter()
        with _autocast(opts, device):
            loss = _loss(model(x), torch.zeros(batch, dtype=torch.long, device=device))
        loss.backward()
        _sync(device)
        out["first_train_step_s"] = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
    after = _triton_stats()
    out["triton_configs"] = None if after is None else {k: v - before.get(k, 0) for k, v in after.items()}
    return out


# ---------------------------------------------------------------------------------------------
# The sweep
# ---------------------------------------------------------------------------------------------

def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """Device name and library versions, repeated in every output line."""
    import linvision
    import timm
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        import platform
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    try:
        from linvision.attn.ops import autotune
        tuning = autotune.autotune_mode()
    except (ImportError, ValueError) as e:      # no Triton, or a bad LINVISION_TRITON_AUTOTUNE
        tuning = one_line(e)
    return {"device": name, "torch": torch.__version__, "timm": timm.__version__, "triton": _version("triton"),
            "linvision": linvision.__version__, "cuda": torch.version.cuda, "triton_autotune": tuning}


def _models_in_order(models: Sequence[str], reference: Optional[str]) -> List[str]:
    if reference is None:
        return list(models)
    return [reference] + [m for m in models if m != reference]


def run(models: Sequence[str], cases: Sequence[Tuple[Tuple[int, int], int]], opts: Options,
        emit: Callable[[Dict[str, Any]], None] = lambda row: print(json.dumps(row), flush=True)
        ) -> List[Dict[str, Any]]:
    """Measure every model at every (resolution, batch) case in every mode; ``emit`` each output object as it
    is made (default: print one JSON line) and return them all.

    Order: resolution, then model (the reference of ``opts.compare`` first, so each other model's line can
    carry its ratio to it), then batch size, then mode. A model is built once per resolution (on the CPU,
    counted, then moved to the device) and freed before the next. With ``opts.rounds`` > 1 every model of a
    resolution is built and kept on the device together, and each case's timed calls alternate between
    them in that many rounds (lines then come per batch size and mode, models in the same order)."""
    device = torch.device(opts.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {opts.device!r} requested but CUDA is not available")
    env = environment(device)
    options = {k: v for k, v in dataclasses.asdict(opts).items()}
    rows: List[Dict[str, Any]] = []
    reference: Dict[Tuple, Dict[str, Any]] = {}

    def put(row: Dict[str, Any]) -> None:
        row = {**row, **env, "options": options}
        rows.append(row)
        emit(row)

    resolutions = list(dict.fromkeys(size for size, _ in cases))
    for size in resolutions:
        batches = [b for s, b in cases if s == size]
        names = _models_in_order(models, opts.compare)
        for group in ([names] if opts.rounds > 1 else [[name] for name in names]):
            built: Dict[str, Tuple[nn.Module, Dict[str, Any]]] = {}
            for name in group:
                base = {"model": name, "img_size": list(size)}
                try:
                    model = build_model(name, size, opts.model_kwargs)
                    counts = complexity(model, size)
                    if opts.channels_last:
                        model = model.to(memory_format=torch.channels_last)
                    built[name] = (model.to(device), counts)
                except Exception as e:  # noqa: BLE001 - one model failing to build does not stop the sweep
                    status, message = ("oom" if is_oom(e) else "error"), one_line(e)
                    free_memory(device)
                    for batch in batches:
                        for mode in opts.modes():
                            put({"kind": "case", "status": status, **base, "batch_size": batch, "mode": mode,
                                 "error": message})
                    continue
                if opts.cold_start:
                    try:
                        put({"kind": "cold_start", "status": "ok", **base, "batch_size": batches[0],
                             **cold_start(built[name][0], batches[0], size, opts, device)})
                    except Exception as e:  # noqa: BLE001
                        put({"kind": "cold_start", "status": "oom" if is_oom(e) else "error", **base,
                             "batch_size": batches[0], "error": one_line(e)})
                    free_memory(device)
            for batch in batches:
                for mode in opts.modes():
                    results = _measure_case({name: model for name, (model, _) in built.items()}, batch, size,
                                            mode, opts, device)
                    for name, (_, counts) in built.items():
                        row = {"kind": "case", "model": name, "img_size": list(size), "batch_size": batch,
                               "mode": mode, **counts,
                               "cuda_graph": opts.cuda_graph and mode == "infer" and device.type == "cuda",
                               **results[name]}
                        if row["status"] == "ok" and row.get("gmacs") is not None:
                            row["tflops"] = 2 * row["gmacs"] * row["img_per_s"] / 1e3 * (3 if mode == "train" else 1)
                        key = (tuple(size), batch, mode)
                        if name == opts.compare:
                            reference[key] = row
                        elif opts.compare is not None:
                            row.update(_ratio(row, reference.get(key), opts.compare))
                        put(row)
            del built
            if opts.compile:
                torch._dynamo.reset()
            free_memory(device)
    return rows


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _start_window(device: torch.device) -> int:
    """Reset the peak-memory counter; returns the bytes allocated now (the window's base)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _allocated(device)


def _window_peak(device: torch.device, base: int) -> int:
    """Bytes allocated at the peak since :func:`_start_window`, above its base."""
    return torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0


def _resident_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    seen: Dict[Tuple[Any, int], int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[(t.device, t.data_ptr())] = t.numel() * t.element_size()
    return sum(seen.values())


def _split(reps: int, rounds: int) -> List[int]:
    """``reps`` timed calls over ``rounds`` rounds, as even as they go (earlier rounds take the remainder)."""
    return [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]


def _failure(exc: BaseException, peak: Optional[int]) -> Dict[str, Any]:
    return {"status": "oom" if is_oom(exc) else "error", "error": one_line(exc),
            "peak_mem_mib": None if peak is None else peak / 2 ** 20}


def _measure_case(models: Dict[str, nn.Module], batch: int, size: Tuple[int, int], mode: str, opts: Options,
                  device: torch.device) -> Dict[str, Dict[str, Any]]:
    """One case for each model: prepared and warmed up one after the other, then timed in ``opts.rounds``
    rounds that alternate between the models. Returns each model's result fields: ``status`` ok/oom/error
    (a failure in ``error``; the other models go on), the times, ``peak_mem_mib`` and, with rounds > 1,
    ``round_medians_ms``.

    ``peak_mem_mib`` is the model's own: its weights, what its prepared case keeps (input, optimizer state,
    graph pool) and the largest transient of any of its calls; other models kept on the device alongside
    are not counted. None on the CPU."""
    cuda = device.type == "cuda"
    results: Dict[str, Dict[str, Any]] = {}
    live: Dict[str, Dict[str, Any]] = {}
    for name, model in models.items():
        free_memory(device)
        weights = _resident_bytes(model)
        base = _start_window(device)
        try:
            prepared = PREPARE[mode](model, batch, size, opts, device)
        except Exception as e:  # noqa: BLE001 - record and go on with the sweep
            results[name] = _failure(e, _window_peak(device, base) + weights if cuda else None)
            model.zero_grad(set_to_none=True)
            continue
        live[name] = {"prepared": prepared, "peak": _window_peak(device, base) + weights, "times": [],
                      "rounds": [], "held": _allocated(device) - base + weights,
                      "split": _split(prepared.reps, opts.rounds)}
    for r in range(opts.rounds):
        for name in list(live):
            entry = live[name]
            if not entry["split"][r]:
                continue
            base = _start_window(device)
            try:
                times = time_calls(entry["prepared"].step, entry["split"][r], device)
            except Exception as e:  # noqa: BLE001
                results[name] = _failure(e, _window_peak(device, base) + entry["held"] if cuda else None)
                entry["prepared"].close()
                models[name].zero_grad(set_to_none=True)
                del live[name]
                continue
            entry["times"] += times
            entry["rounds"].append(statistics.median(times))
            entry["peak"] = max(entry["peak"], _window_peak(device, base) + entry["held"])
    for name, entry in live.items():
        entry["prepared"].close()
        models[name].zero_grad(set_to_none=True)
        results[name] = {"status": "ok", **entry["prepared"].extra, **_summarise(entry["times"], batch),
                         "peak_mem_mib": entry["peak"] / 2 ** 20 if cuda else None}
        if opts.rounds > 1:
            results[name]["round_medians_ms"] = entry["rounds"]
    # Any exception (and its frames' tensors) is gone here, so the memory can be released.
    live.clear()
    free_memory(device)
    return {name: results[name] for name in models}


def _ratio(row: Dict[str, Any], ref: Optional[Dict[str, Any]], ref_name: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"ref_model": ref_name}
    if ref is None or ref.get("status") != "ok" or row.get("status") != "ok":
        out.update(ref_img_per_s=ref.get("img_per_s") if ref else None, speedup_vs_ref=None, mem_vs_ref=None)
        return out
    out["ref_img_per_s"] = ref["img_per_s"]
    out["speedup_vs_ref"] = row["img_per_s"] / ref["img_per_s"]
    out["mem_vs_ref"] = (row["peak_mem_mib"] / ref["peak_mem_mib"]
                         if row.get("peak_mem_mib") and ref.get("peak_mem_mib") else None)
    return out


# ---------------------------------------------------------------------------------------------
# Reading, summarising, plotting
# ---------------------------------------------------------------------------------------------

def read_jsonl(path) -> List[Dict[str, Any]]:
    """The JSON objects of a file of JSON lines (blank lines and lines not starting with ``{`` skipped)."""
    rows = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line.startswith("{"):
            rows.append(json.loads(line))
    return rows


def summary(rows: Iterable[Dict[str, Any]]) -> str:
    """A Markdown table of the case rows: img/s, peak memory and the ratio to the reference, if any."""
    lines = ["| model | size | batch | mode | status | img/s | ms | peak MiB | GMACs | × ref |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    for r in rows:
        if r.get("kind") != "case":
            continue
        lines.append(f"| {r['model']} | {'x'.join(map(str, r['img_size']))} | {r['batch_size']} | {r['mode']} | "
                     f"{r['status']} | {fmt(r.get('img_per_s'), '.1f')} | {fmt(r.get('ms_median'), '.2f')} | "
                     f"{fmt(r.get('peak_mem_mib'), '.0f')} | {fmt(r.get('gmacs'), '.2f')} | "
                     f"{fmt(r.get('speedup_vs_ref'), '.2f')} |")
    return "\n".join(lines)


def plot(rows: Iterable[Dict[str, Any]], out_path) -> Path:
    """Throughput (img/s, log scale) and peak memory (GiB) against resolution (√(H·W), log scale), one
    line per model (per model and batch size when a model ran at several), one row of panels per mode;
    written atomically as an image (PNG by the file's suffix)."""
    import matplotlib  # imported here: plotting is optional and matplotlib is slow to import
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from linvision.checkpoint import atomic_write

    rows = [r for r in rows if r.get("kind") == "case" and r.get("status") == "ok"]
    if not rows:
        raise ValueError("nothing to plot: no successful case rows")
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    several = {m for m in {r["model"] for r in rows}
               if len({r["batch_size"] for r in rows if r["model"] == m and r["mode"] == modes[0]}) > 1}
    fig, axes = plt.subplots(len(modes), 2, figsize=(12, 4.2 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        lines: Dict[str, List[Tuple[float, float, Optional[float]]]] = {}
        for r in rows:
            if r["mode"] != mode:
                continue
            label = r["model"] + (f" (bs {r['batch_size']})" if r["model"] in several else "")
            side = math.sqrt(r["img_size"][0] * r["img_size"][1])
            mem = r.get("peak_mem_mib")
            lines.setdefault(label, []).append((side, r["img_per_s"], None if mem is None else mem / 1024))
        for label, points in sorted(lines.items()):
            points.sort()
            xs = [p[0] for p in points]
            axes[i][0].plot(xs, [p[1] for p in points], marker="o", label=label)
            mem_points = [(p[0], p[2]) for p in points if p[2] is not None]
            if mem_points:
                axes[i][1].plot(*zip(*mem_points), marker="o", label=label)
        sides = sorted({p[0] for points in lines.values() for p in points})
        for j, ylabel in enumerate(("images / s", "peak memory (GiB)")):
            ax = axes[i][j]
            ax.set_xscale("log", base=2)
            ax.set_xticks(sides, [f"{s:.0f}" for s in sides])
            ax.minorticks_off()
            if j == 0:
                ax.set_yscale("log")
            elif not ax.lines:
                ax.text(0.5, 0.5, "not measured (CPU)", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel("resolution (√(H·W) pixels)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{'inference' if mode == 'infer' else 'training step'}: {ylabel}")
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"{rows[0].get('device', '')}, torch {rows[0].get('torch', '')}")
    fig.tight_layout()
    out_path = Path(out_path)

    def write(tmp: str) -> None:
        fig.savefig(tmp, dpi=110, format=out_path.suffix.lstrip(".") or "png")
    try:
        return atomic_write(out_path, write)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser():
    import argparse
    parser = argparse.ArgumentParser(
        prog="benchmark.py", description="Whole-model inference/training throughput and memory as JSON lines.",
        epilog="examples:\n"
               "  python tools/benchmark.py linvit_s swin_tiny_patch4_window7_224 --img-size 224 --batch-size 64 "
               "--compare swin_tiny_patch4_window7_224\n"
               "  python tools/benchmark.py linvit_b vit_base_patch16_224 --batch-size 1024:4 2048:1 "
               "--compare vit_base_patch16_224 --plot speed.png\n"
               "  python tools/benchmark.py --plot-from results.jsonl speed.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help="timm model names or wildcards (linvision's are registered)")
    parser.add_argument("--models-from-timm", metavar="PATTERN", help="also every timm model matching PATTERN")
    parser.add_argument("--img-size", nargs="+", default=[], help="resolutions: N or HxW (default 224)")
    parser.add_argument("--batch-size", nargs="+", default=["64"],
                        help="batch sizes (every resolution × every batch) or RES:BATCH pairs")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="autocast")
    parser.add_argument("--amp-dtype", choices=sorted(AMP_DTYPES), default="bfloat16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile (its time reported as compile_s)")
    parser.add_argument("--cuda-graph", action="store_true", help="inference replayed from a CUDA graph")
    parser.add_argument("--grad-checkpointing", action="store_true", help="training with grad checkpointing")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per case")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per case (median reported)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate the models' timed calls in this many rounds per case, all models of a "
                             "resolution kept on the device (for host-bound cases, where the host's speed drifts)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of timed calls per case: fewer than --iters when the warm-up's pace says "
                             "they would take longer (needs --warmup >= 1)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--cold-start", action="store_true",
                        help="also time each model's first forward (and training step) at each resolution")
    parser.add_argument("--compare", metavar="REF", help="report each model's throughput ratio to model REF")
    parser.add_argument("--model-kwargs", nargs="+", default=[], metavar="[MODEL:]KEY=VALUE",
                        help="constructor arguments, for every model or one (e.g. vit_base_patch16_224:"
                             "dynamic_img_size=True)")
    parser.add_argument("--out", metavar="FILE.jsonl", help="also write the JSON lines here (rewritten after each)")
    parser.add_argument("--plot", metavar="OUT.png", help="plot throughput and memory against resolution")
    parser.add_argument("--plot-from", nargs=2, metavar=("RESULTS.jsonl", "OUT.png"),
                        help="only re-plot a saved file of JSON lines")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line (``tools/benchmark.py``). Exit status 0 when every case ran, 1 when any failed or
    ran out of memory (all are still measured and printed), 2 for bad arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plot_from:
        print(f"wrote {plot(read_jsonl(args.plot_from[0]), args.plot_from[1])}", file=sys.stderr)
        return 0
    try:
        models = resolve_models(args.models, args.models_from_timm)
        if not models and not args.compare:
            raise ValueError("give at least one model (or --models-from-timm)")
        cases = plan_cases(args.img_size or ([] if ":" in args.batch_size[0] else ["224"]), args.batch_size)
        for name, value in (("--warmup", args.warmup), ("--iters", args.iters), ("--rounds", args.rounds)):
            if value < (0 if name == "--warmup" else 1):
                raise ValueError(f"{name} must be {'>= 0' if name == '--warmup' else '>= 1'}, got {value}")
        opts = Options(mode=args.mode, amp=args.amp, amp_dtype=args.amp_dtype, channels_last=args.channels_last,
                       compile=args.compile, cuda_graph=args.cuda_graph, grad_checkpointing=args.grad_checkpointing,
                       warmup=args.warmup, iters=args.iters, rounds=args.rounds, time_budget=args.time_budget,
                       device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                       cold_start=args.cold_start, compare=args.compare,
                       model_kwargs=parse_model_kwargs(args.model_kwargs))
    except ValueError as e:
        parser.error(str(e))
    lines: List[str] = []

    def emit(row: Dict[str, Any]) -> None:
        text = json.dumps(row)
        print(text, flush=True)
        if args.out:
            from linvision.checkpoint import atomic_write
            lines.append(text)
            atomic_write(args.out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    rows = run(models, cases, opts, emit)
    print(summary(rows), file=sys.stderr)
    if args.plot:
        try:
            print(f"wrote {plot(rows, args.plot)}", file=sys.stderr)
        except ValueError as e:
            print(f"no plot: {e}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in rows) else 1
