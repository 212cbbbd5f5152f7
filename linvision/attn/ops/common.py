"""Pieces shared by the forward and backward linear-attention kernels.

* ``feature``/``feature_grad``: the elementwise feature maps φ (0 identity, 1 relu, 2 elu1 = ELU+1)
  and their derivatives, in float32.
* ``rope``: numerator-only 2-D RoPE computed in-kernel from the ``(d/2,)`` angle buffer and the
  grid width (no sin/cos tables in HBM); ``INVERSE`` applies ``Rᵀ`` (for gradients).
* launch policy: how many programs split the token axis (``reduce_splits``/``token_grid``) and
  the autotune config lists (one config under ``TRITON_INTERPRET=1``, whose autotuner cannot bench).
* launching: each kernel's config chosen once per key (``launch``; default, cached on disk or tuned,
  see :mod:`.autotune`), compiled kernels kept and launched directly (``launch``, ``KernelCall``); second
  passes tuned together with the pass they depend on (``tune_after``), timed from CUDA graphs with L2
  evicted (``capture_graph``, ``time_clean``, which ``tools/benchmark_attn.py`` uses too).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, List, Optional

import torch
import triton
import triton.compiler.errors
import triton.language as tl
import triton.runtime.errors

from . import autotune

FEATURE_IDS = {"identity": 0, "relu": 1, "elu1": 2}
NORMALIZATION_IDS = {"division": 0, "magnitude_aware": 1, "injective": 2, "none": 3}
MAX_HEAD_DIM = 128

# Set by tests to force a number of token splits (exercises the fp32-atomic reduction on tiny inputs).
FORCE_SPLITS: Optional[int] = None
# Reduction (state) kernels: programs per SM aimed at, and fewest tokens per program (keeps the
# fp32 partial-state atomics small relative to the token traffic). 192, not 512: at (8,4,3136,64)
# the state pass takes 14.1 µs with 17 splits against 16.5 µs with 7 (H100, docs/kernels.md).
REDUCE_PROGRAMS_PER_SM = 4
REDUCE_MIN_TOKENS = 192
# Programs adding into one copy of a head's state: more splits than this add into several fp32
# copies (summed afterwards), since atomics on one address serialise.
REDUCE_SPLITS_PER_COPY = 32
# Token-parallel kernels: up to this many programs per SM, each looping over a run of tiles
# (with the next tile's loads issued before the current tile is computed).
TOKEN_PROGRAMS_PER_SM = 4

DOT_MODES = {"tf32x3": 0, "tf32": 1, "bf16": 2}


# Read once: both must be set before this module is imported (Triton reads TRITON_INTERPRET then too).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_DOT_OVERRIDE = os.environ.get("LINVISION_TRITON_DOT")
# Tile order of the fixed config (tests run the suite once per order; read in .autotune).
_TEST_TILE_ORDER = autotune.FIXED_TILE_ORDER


def autotune_configs(kind: str) -> List[triton.Config]:
    """Autotune configs for a kernel kind (``"reduce"`` or ``"token"``): the ones ``tune`` mode may benchmark.

    One config (``autotune.fixed_config``) under the interpreter (its autotuner needs a GPU driver to bench)
    or when the kernels are imported with ``LINVISION_TRITON_AUTOTUNE=0`` (fast compiles for tests; its tile
    order from ``LINVISION_TRITON_TILE_ORDER``); otherwise ``autotune.sweep_configs(kind)``, a small sweep
    over the token-tile size ``BN``, warps, pipeline depth and tile order (``STRIDED``, see :func:`tile_range`).
    Which of them runs is chosen per key by :func:`launch` (see :mod:`.autotune`).
    """
    if autotune.IMPORT_MODE == "fixed":
        return [autotune.fixed_config()]
    return autotune.sweep_configs(kind)


@functools.lru_cache(maxsize=None)
def _properties(device_index: int):
    return torch.cuda.get_device_properties(device_index)


def cuda_properties(device: torch.device):
    """``torch.cuda.get_device_properties`` of a CUDA ``device`` (the current one if it has no index), cached."""
    return _properties(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1            # interpreter: fewest programs is fastest
    return cuda_properties(device).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (``triton.cdiv`` is a constexpr function whose wrapper costs µs per call)."""
    return -(-a // b)


def reduce_splits(bh: int, n: int, device: torch.device) -> int:
    """Programs per head for kernels that reduce over tokens (partial states summed by fp32 atomics)."""
    if FORCE_SPLITS is not None:
        return max(1, min(FORCE_SPLITS, n))
    want = cdiv(REDUCE_PROGRAMS_PER_SM * num_sms(device), bh)
    return max(1, min(want, cdiv(n, REDUCE_MIN_TOKENS)))


class ReduceBuffer:
    """Layout of a reduction pass's fp32 buffer for ``splits`` programs per head: ``(copies, B·H, size)``.

    Programs add their partial states into it with fp32 atomics, so it is zeroed when ``splits > 1``;
    more than ``REDUCE_SPLITS_PER_COPY`` programs per head add into several copies (atomics on one address
    serialise), which :meth:`total` sums afterwards."""

    __slots__ = ("copies", "shape", "zeroed")

    def __init__(self, bh: int, size: int, splits: int):
        self.copies = 1 if splits == 1 else cdiv(splits, REDUCE_SPLITS_PER_COPY)
        self.shape = (self.copies, bh, size)
        self.zeroed = splits > 1

    def allocate(self, device: torch.device) -> torch.Tensor:
        return (torch.zeros if self.zeroed else torch.empty)(self.shape, device=device, dtype=torch.float32)

    def total(self, buf: torch.Tensor) -> torch.Tensor:
        """The reduced ``(B·H, size)`` state: copy 0, or the sum of the copies."""
        return buf[0] if self.copies == 1 else buf.sum(0)


def layout_like(t: torch.Tensor) -> tuple:
    """Strides of ``torch.empty_like(t)`` (PyTorch's ``preserve_format`` rule): t's own when t is dense, else dense
    strides in t's dimension order. The kernels write outputs and gradients in this layout: for a ``(B, H, N, d)``
    view of a projection's output (``(B, N, H, d)`` or ``(B, H, d, N)`` in memory), the way back to tokens
    (``transpose(1, 2).reshape(B, N, C)``, ``transpose(-1, -2).reshape(B, C, H, W)``) is then a view, not a copy."""
    return torch.empty_like(t, device="meta").stride()


def token_grid(bh: int, n: int, device: torch.device):
    """Grid of a token-parallel kernel: ``(B·H, splits)``, at most one program per ``BN`` tokens."""
    if FORCE_SPLITS is not None:
        want = FORCE_SPLITS
    else:
        want = cdiv(TOKEN_PROGRAMS_PER_SM * num_sms(device), bh)
    return split_grid(bh, n, want)


def size_class(n: int) -> int:
    """Token-count class that the autotune keys include (``SIZE_CLASS``): 0 for N ≤ 1024, 1 to 8192, 2 to
    65536, 3 above. Configs are tuned per class, not per N (one sweep per class, not per resolution): the
    best tile order and size differ between N = 3136 and N = 50176 (docs/kernels.md)."""
    return 0 if n <= 1024 else 1 if n <= 8192 else 2 if n <= 65536 else 3


def split_grid(bh: int, n: int, splits: int):
    """Grid ``(B·H, programs per head)``: ``splits`` programs per head, but no more than one per ``BN`` tokens."""
    return lambda meta: (bh, max(1, min(splits, cdiv(n, meta["BN"]))))


def dot_mode(*tensors: torch.Tensor) -> int:
    """How the kernels multiply: bf16 operands for bf16 inputs (what the inputs carry anyway); tf32
    operands for fp16 inputs (fp16's range cannot hold every w·φ(k) product); 3×tf32 (≈ fp32) for
    fp32 inputs and under the interpreter (whose bf16 ``tl.dot`` is wrong). fp32 accumulation always.
    ``LINVISION_TRITON_DOT`` (tf32x3 | tf32 | bf16, read at import) overrides, for experiments."""
    if INTERPRETING:
        return DOT_MODES["tf32x3"]
    if _DOT_OVERRIDE:
        return DOT_MODES[_DOT_OVERRIDE]
    dtypes = {t.dtype for t in tensors}
    if dtypes == {torch.bfloat16}:
        return DOT_MODES["bf16"]
    if torch.float32 in dtypes:
        return DOT_MODES["tf32x3"]
    return DOT_MODES["tf32"]


_TUNED: dict = {}      # (kernel, autotune-key values, dtypes) -> the chosen triton.Config
_SOURCES: dict = {}    # the same keys -> where the config came from: "fixed", "cached", "tuned" or "default"
_KERNELS: dict = {}    # id -> the triton.autotune objects that launch() has chosen configs for
_COMPILED: dict = {}   # (device, kernel, constexprs, argument specialisation) -> (CompiledKernel, tail, meta)
_COMPILED_MAX = 4096   # entries before the direct-launch cache is cleared (one per shape/layout seen)


def _direct_launch_available() -> bool:
    """Whether compiled kernels can be launched without ``JITFunction.run``: Triton >= 3.3 (``triton.knobs``
    and the ``CompiledKernel.run`` signature used below), not the interpreter."""
    if INTERPRETING or os.environ.get("LINVISION_TRITON_DIRECT_LAUNCH", "1") == "0":
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 3) and hasattr(triton, "knobs")


DIRECT_LAUNCH = _direct_launch_available()


def _dependent_launch_available() -> bool:
    """Whether this Triton can launch a kernel as a programmatic dependent of the previous one (the
    ``launch_pdl`` compile option and ``gdc_wait``/``gdc_launch_dependents``, Triton >= 3.4), not the
    interpreter, and ``LINVISION_TRITON_PDL`` is not 0."""
    if INTERPRETING or os.environ.get("LINVISION_TRITON_PDL", "1") == "0":
        return False
    try:
        import triton.language.extra.cuda as cuda_extra
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return ("launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}) and hasattr(cuda_extra, "gdc_wait")
            and hasattr(cuda_extra, "gdc_launch_dependents"))


# Second passes (output, k/v-side backward) are launched as programmatic dependents of the first
# (Hopper and newer): their programs start, and load their first token tile, while the first pass's
# last programs still add their partial states; ``wait_for_previous_pass`` then holds them until the
# first pass's writes are visible. Tests may turn it off.
DEPENDENT_LAUNCH = _dependent_launch_available()


def dependent_launch(device: torch.device) -> bool:
    """Whether second passes on ``device`` are launched as programmatic dependents (sm_90+, see above)."""
    if not DEPENDENT_LAUNCH or device.type != "cuda":
        return False
    return cuda_properties(device).major >= 9


def dependent_consts(device: torch.device, second_pass: bool) -> dict:
    """The ``PDL`` constexpr of a pass (first pass: let the second start early; second pass: wait for the
    first), plus the ``launch_pdl`` compile option for a second pass."""
    if not dependent_launch(device):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True} if second_pass else {"PDL": True}


def _specialisation(args: tuple) -> tuple:
    """What a launch is compiled for, as far as our argument kinds go: each tensor's dtype and 16-byte
    alignment (Triton specialises pointers on it), ints by value (Triton specialises on == 1 and
    divisibility by 16, so exact values are a finer key), floats not at all. Arguments are tensors,
    ints or floats (``type`` checks: this runs for every launch)."""
    return tuple(a if type(a) is int else None if type(a) is float else (a.dtype, a.data_ptr() % 16 == 0)
                 for a in args)


class Direct:
    """A kept ``CompiledKernel`` with its grid and its non-tensor arguments fixed: ``direct(tensors)``
    launches it on the current stream, with the same launcher, metadata and profiler hooks that
    ``JITFunction.run`` uses on a cache hit, but none of its per-call binding, cache-key and option
    handling (tens of µs per launch on the lent H100's host; these kernels run for ten)."""

    __slots__ = ("compiled", "grid", "rest", "device")

    def __init__(self, compiled, grid: tuple, rest: tuple, device: int):
        self.compiled, self.grid, self.rest, self.device = compiled, grid, rest, device

    def __call__(self, tensors: tuple) -> None:
        c, g = self.compiled, self.grid
        stream = _current_stream(self.device)
        args = tensors + self.rest
        enter = _RUNTIME.launch_enter_hook
        c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata,
              None if enter is None else c.launch_metadata(g, stream, *args), enter, _RUNTIME.launch_exit_hook, *args)


_RUNTIME = triton.knobs.runtime if DIRECT_LAUNCH else None
_current_stream = None    # the driver's get_current_stream, bound at the first kept kernel


# What a config that cannot be built for this GPU raises (the autotuner skips those configs too).
_CONFIG_ERRORS = tuple(e for e in (getattr(triton.runtime.errors, "OutOfResources", None),
                                   getattr(triton.runtime.errors, "PTXASError", None),
                                   getattr(triton.compiler.errors, "CompileTimeAssertionFailure", None)) if e)


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
    back, as ``do_bench``'s ``zero_()`` does (about 16 µs at 3 TB/s, a large share of these passes)."""
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
    """Median device time (ms) of ``fn`` replayed from a CUDA graph with L2 clean (:func:`time_clean`). The
    graph keeps host time out: these passes run for tens of µs, about what their launches take on the host,
    so events around eager calls would time the host."""
    return time_clean(capture_graph(fn).replay, reps)


def tune_after(kernel, grid, args: tuple, consts: dict, preceding_pass: Callable[[], object],
               bench: Callable[[Callable[[], object]], float] = replay_time):
    """The config of ``kernel`` (a ``triton.autotune`` object) whose launch, right after ``preceding_pass()``,
    takes the least time for both: how second passes are tuned.

    A second pass is launched as a programmatic dependent of the first and loads its first token tile before
    it waits, so how much of it overlaps the first pass's tail depends on its config, which timing it alone
    cannot show. At (32,3,3136,32) bf16 the output pass alone takes the same time with BN 64 and BN 128, but
    the whole forward takes 35.5 µs with BN 64 against 33.4 with BN 128 (H100, docs/kernels.md).
    ``preceding_pass`` re-runs the first pass on buffers of its own; ``bench`` times a callable (only the
    order of its results matters).
    """
    if getattr(kernel, "reset_to_zero", None) or getattr(kernel, "restore_value", None):
        raise ValueError(f"tune_after times {kernel.fn.__name__} without the autotuner's buffer resets; "
                         "it takes kernels without reset_to_zero/restore_value (the second passes)")
    times = {}
    for config in kernel.configs:
        kwargs = {**consts, **config.all_kwargs()}

        def both(kwargs=kwargs):
            preceding_pass()
            kernel.fn[grid](*args, **kwargs)
        try:
            times[config] = bench(both)
        except _CONFIG_ERRORS:
            continue
    if not times:
        raise RuntimeError(f"no config of {kernel.fn.__name__} could be built for this GPU "
                           f"({len(kernel.configs)} tried)")
    return min(times, key=times.get)


@functools.lru_cache(maxsize=None)
def device_identity(device_index: int) -> tuple:
    """``(GPU name, compute capability "9.0")`` of a CUDA device: what a cached config is tuned for."""
    props = _properties(device_index)
    return props.name, f"{props.major}.{props.minor}"


def current_device_identity() -> tuple:
    """:func:`device_identity` of the device Triton launches on now (a fixed pair under the interpreter)."""
    if INTERPRETING:
        return "triton interpreter", "0.0"
    return device_identity(triton.runtime.driver.active.get_current_device())


def _choose_config(kernel, grid, args: tuple, consts: dict, named: dict, tune_key: tuple,
                   preceding_pass: Optional[Callable[[], object]]):
    """The config for a key seen for the first time (``autotune.select_config``), and whether choosing it
    has launched the kernel already (``triton.autotune`` runs the winner after benchmarking)."""
    launched = False

    def tune():
        nonlocal launched
        if preceding_pass is None:
            kernel[grid](*args, **consts)      # benchmarks every config, then launches the fastest
            launched = True
            return kernel.best_config
        return tune_after(kernel, grid, args, consts, preceding_pass)

    mode = autotune.autotune_mode()
    if mode == "tune" and len(kernel.configs) == 1:
        mode = "fixed"                         # imported with one config: nothing to choose from
    if mode == "fixed":
        config, source = autotune.fixed_config(), "fixed"
    else:
        capturing = not INTERPRETING and torch.cuda.is_current_stream_capturing()
        config, source = autotune.select_config(
            kernel.fn.__name__, autotune.source_hash(kernel.fn), {k: named[k] for k in kernel.keys}, tune_key[2],
            list(kernel.configs[0].kwargs), current_device_identity(), tune=None if capturing else tune, mode=mode)
    _TUNED[tune_key], _SOURCES[tune_key], _KERNELS[id(kernel)] = config, source, kernel
    autotune.STATS[source] += 1
    return config, launched


def forget_choices(sources=("default",)) -> None:
    """Forget the configs chosen from ``sources`` and every kept kernel and launch plan (they hold the
    configs), so that the next calls choose again (``autotune.tuning``). ``"cached"`` in ``sources`` also
    clears ``triton.autotune``'s own in-memory results."""
    for key in [k for k, source in _SOURCES.items() if source in sources]:
        _TUNED.pop(key, None)
        _SOURCES.pop(key, None)
    if "cached" in sources:
        for kernel in _KERNELS.values():
            kernel.cache.clear()
    _COMPILED.clear()
    for plans in _PLAN_CACHES:
        plans.clear()


def launch(kernel, grid, args: tuple, consts: dict, preceding_pass: Optional[Callable[[], object]] = None
           ) -> Optional[Direct]:
    """Launch an autotuned kernel with the least host work. ``args``: its runtime arguments, tensors
    first, then ints/floats.

    * First call for a (kernel, constexprs, dtypes) key: the config is chosen by the mode in force
      (:mod:`.autotune`): the fixed one, the one cached on disk, the built-in default, or (``tune``)
      benchmarked — through ``triton.autotune`` for first passes, by :func:`tune_after` for a second pass
      given its ``preceding_pass`` (each config timed together with the pass it depends on).
    * First call for a new argument specialisation: ``JITFunction.run`` with that config (compiles or
      finds the binary) and the ``CompiledKernel`` is kept.
    * Every later call launches the kept ``CompiledKernel`` directly (:class:`Direct`).

    Returns the :class:`Direct` for these exact non-tensor arguments once a kernel is kept (else None), so
    that a caller which keys it on everything that fixes them (:class:`KernelCall`) can skip this function.
    """
    global _current_stream
    if DIRECT_LAUNCH:
        device = triton.runtime.driver.active.get_current_device()
        key = (device, kernel, tuple(consts.values()), _specialisation(args))
        entry = _COMPILED.get(key)
        if entry is not None:
            compiled, tail, meta = entry
            g = tuple(grid(meta)) + (1, 1)
            n_tensors = sum(isinstance(a, torch.Tensor) for a in args)
            direct = Direct(compiled, g[:3], args[n_tensors:] + tail, device)
            direct(args[:n_tensors])
            return direct
    # The autotuner's own key: its key arguments' values and the tensors' dtypes.
    named = {**dict(zip(kernel.fn.arg_names, args)), **consts}
    tune_key = (id(kernel), tuple(named[k] for k in kernel.keys),
                tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor)))
    config = _TUNED.get(tune_key)
    if config is None:
        config, launched = _choose_config(kernel, grid, args, consts, named, tune_key, preceding_pass)
        if launched:
            return None
    kwargs = {**consts, **config.all_kwargs()}
    try:
        compiled = kernel.fn[grid](*args, **kwargs)
    except _CONFIG_ERRORS:
        if _SOURCES.get(tune_key) != "default":
            raise
        # A default this GPU cannot build (fewer registers or less shared memory than an H100 has): the
        # fixed config, which every kernel builds with on the GPUs tested.
        config = _TUNED[tune_key] = autotune.fixed_config()
        _SOURCES[tune_key] = "fixed"
        kwargs = {**consts, **config.all_kwargs()}
        compiled = kernel.fn[grid](*args, **kwargs)
    if DIRECT_LAUNCH and compiled is not None:
        names = kernel.fn.arg_names[len(args):]
        if all(name in kwargs for name in names):  # the constexprs, in signature order, after the runtime args
            if len(_COMPILED) >= _COMPILED_MAX:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tuple(kwargs[name] for name in names), {**consts, **config.kwargs})
            if _current_stream is None:
                _current_stream = triton.runtime.driver.active.get_current_stream
    return None


def tensor_key(*tensors) -> tuple:
    """What a pass's launch depends on per tensor argument (None stays None): shape, strides, dtype,
    device and whether the data pointer is 16-byte aligned (Triton specialises pointers on it)."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                 for t in tensors)


def policy_key() -> tuple:
    """The launch-policy settings a pass's grid and buffers depend on (tests and sweeps change them)."""
    return (FORCE_SPLITS, REDUCE_PROGRAMS_PER_SM, REDUCE_MIN_TOKENS, REDUCE_SPLITS_PER_COPY, TOKEN_PROGRAMS_PER_SM,
            DEPENDENT_LAUNCH)


class KernelCall:
    """One launch site with its non-tensor arguments fixed: ``call(*tensors)``.

    The host functions build one per pass signature (cached on :func:`tensor_key`, options and
    :func:`policy_key`, which fix every scalar argument, the grid and the specialisation). The first calls
    go through :func:`launch` (autotune, then compile); once it hands back a :class:`Direct`, later calls
    launch that directly: no grid, key or argument work per call."""

    __slots__ = ("kernel", "grid", "scalars", "consts", "direct")

    def __init__(self, kernel, grid, scalars: tuple, consts: dict):
        self.kernel, self.grid, self.scalars, self.consts, self.direct = kernel, grid, scalars, consts, None

    def __call__(self, *tensors, preceding_pass: Optional[Callable[[], object]] = None) -> None:
        """Launch on ``tensors``; ``preceding_pass`` (second passes) is used only while the config is tuned."""
        if self.direct is not None:
            self.direct(tensors)
        else:
            self.direct = launch(self.kernel, self.grid, tensors + self.scalars, self.consts, preceding_pass)


_PLAN_CACHES: list = []   # every PlanCache, for forget_choices


class PlanCache(dict):
    """``key -> plan`` for one host function, cleared when it grows past ``_COMPILED_MAX`` entries (one
    per shape/layout/option set seen)."""

    def __init__(self):
        super().__init__()
        _PLAN_CACHES.append(self)

    def put(self, key, plan):
        if len(self) >= _COMPILED_MAX:
            self.clear()
        self[key] = plan
        return plan


def block(dim: int) -> int:
    """Register block for a head dim: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, 1 << (dim - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# In-kernel helpers
# ---------------------------------------------------------------------------------------------

if DEPENDENT_LAUNCH:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    @triton.jit
    def start_next_pass(PDL: tl.constexpr):
        """Let the next kernel (a second pass launched as a programmatic dependent) start its programs
        once every program of this one has begun: they fill SMs as this pass's programs finish."""
        if PDL:
            gdc_launch_dependents()

    @triton.jit
    def wait_for_previous_pass(PDL: tl.constexpr):
        """Block until the previous kernel has finished and its writes are visible (no-op unless ``PDL``)."""
        if PDL:
            gdc_wait()
else:
    @triton.jit
    def start_next_pass(PDL: tl.constexpr):
        pass

    @triton.jit
    def wait_for_previous_pass(PDL: tl.constexpr):
        pass


@triton.jit
def mm(a, b, DOT_MODE: tl.constexpr):
    """``a @ b`` with fp32 accumulation; operands as ``DOT_MODE`` says (see :func:`dot_mode`)."""
    if DOT_MODE == 2:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
    elif DOT_MODE == 1:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32")
    else:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return out


@triton.jit
def tile_range(N, BN: tl.constexpr, STRIDED: tl.constexpr):
    """This program's share of the ``cdiv(N, BN)`` token tiles of a head, split over grid axis 1's S programs.

    Contiguous (``STRIDED`` False): program s takes a run of adjacent tiles. Strided: program s takes tiles
    s, s+S, s+2S, … — a head's S programs then stream adjacent tiles at the same time, which DRAM serves
    faster for the long reductions (state pass 42.4 → 38.6 µs at (2,4,50176,64), H100, docs/kernels.md) but
    not at every shape, so the autotuner chooses. Returns ``(tile count, row step, end row, token indices of
    the first tile)``; rows at or past the end row are masked.
    """
    n_tiles = tl.cdiv(N, BN)
    if STRIDED:
        first = tl.program_id(1)
        count = tl.cdiv(n_tiles - first, tl.num_programs(1))
        row_step = tl.num_programs(1) * BN
        row_end = N
    else:
        per = tl.cdiv(n_tiles, tl.num_programs(1))
        first = tl.program_id(1) * per
        last = tl.minimum(first + per, n_tiles)
        count = last - first
        row_step = BN
        row_end = tl.minimum(last * BN, N)
    return count, row_step, row_end, first * BN + tl.arange(0, BN)


@triton.jit
def head_ptr(ptr, pid_bh, H, stride_b, stride_h):
    """Pointer to head ``pid_bh`` (= b·H + h) of a ``(B, H, ...)`` tensor with batch/head strides."""
    return ptr + (pid_bh // H) * stride_b + (pid_bh % H) * stride_h


@triton.jit
def tile_ptrs(base, rows, cols, stride_row, stride_col):
    """``(rows, cols)`` pointers into one head (int64 row offsets: they can pass 2³¹); loops advance them by a
    scalar row step rather than forming them again per tile."""
    return base + rows.to(tl.int64)[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def load_at(ptrs, rmask, cmask):
    """Masked 2-D tile at pointers formed by :func:`tile_ptrs` (and advanced by a loop), zeros outside
    ``rmask × cmask``."""
    return tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0)


@triton.jit
def load_tile(base, rows, cols, stride_row, stride_col, rmask, cmask):
    """Masked 2-D tile ``base[rows, cols]`` (addressed as :func:`tile_ptrs`), zeros outside ``rmask × cmask``."""
    return load_at(tile_ptrs(base, rows, cols, stride_row, stride_col), rmask, cmask)


@triton.jit
def first_column(BN: tl.constexpr):
    """``(BN, 16)`` float32 with ones in column 0: ``xᵀ @ first_column`` sums x over its rows on the
    tensor cores, without the cross-warp reduction (and barrier) of ``tl.sum`` in every tile."""
    return (tl.arange(0, 16)[None, :] == 0).to(tl.float32) + tl.zeros((BN, 16), dtype=tl.float32)


@triton.jit
def column0(x):
    """Column 0 of a ``(M, 16)`` accumulator, as an ``(M,)`` vector."""
    return tl.sum(tl.where(tl.arange(0, 16)[None, :] == 0, x, 0.0), axis=1)


@triton.jit
def in_first_row(x):
    """``(16, BN)`` with the ``(BN,)`` vector x in row 0, zeros elsewhere: row 0 of ``in_first_row(γ) @ y`` is
    ``Σ_i γ_i y_i``, the weighted row sum with y as the product's second operand, as computed (no transpose)."""
    return tl.where(tl.arange(0, 16)[:, None] == 0, x[None, :], 0.0)


@triton.jit
def row0(x):
    """Row 0 of a ``(16, M)`` accumulator, as an ``(M,)`` vector."""
    return tl.sum(tl.where(tl.arange(0, 16)[:, None] == 0, x, 0.0), axis=0)


@triton.jit
def feature(x, FEATURE: tl.constexpr):
    if FEATURE == 1:
        x = tl.maximum(x, 0.0)
    elif FEATURE == 2:
        x = tl.where(x > 0, x + 1.0, _exp(x))
    return x


@triton.jit
def feature_grad(x, FEATURE: tl.constexpr):
    """dφ/dx (relu: 0 at x = 0, as torch's relu backward)."""
    if FEATURE == 0:
        g = tl.full(x.shape, 1.0, tl.float32)
    elif FEATURE == 1:
        g = tl.where(x > 0, 1.0, 0.0)
    else:
        g = tl.where(x > 0, 1.0, _exp(x))
    return g


if INTERPRETING:
    @triton.jit
    def _exp(x):
        return tl.exp(x)

    @triton.jit
    def _sin(x):
        return tl.sin(x)

    @triton.jit
    def _cos(x):
        return tl.cos(x)
else:
    # exp as one multiply and the SFU's ex2 with denormal results flushed to zero (exp(x) < 1.2e-38, x < -87):
    # ``tl.exp`` lowers to the non-ftz ex2.approx, which ptxas wraps in a range test, two multiplies and a
    # select per element, the largest share of the elementwise instructions of the ELU+1 kernels.
    @triton.jit
    def _exp(x):
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", constraints="=f,f",
                                         args=[x * 1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1)

    # The SFU's sin/cos (max abs error ~5e-7 on [-π, π]); ``tl.sin`` would lower to libdevice's
    # full-range sinf, several times the instructions. The interpreter cannot run inline PTX.
    @triton.jit
    def _sin(x):
        return tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", constraints="=f,f", args=[x],
                                         dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _cos(x):
        return tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", constraints="=f,f", args=[x],
                                         dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def rope(x, rows, angle_ptr, width, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
         INVERSE: tl.constexpr):
    """Rotate adjacent channel pairs of ``x`` (``(BN, BD)`` float32, token indices ``rows``).

    Token ``t = y*width + x``; pair ``(2m, 2m+1)`` turns by ``y*angle[2m]`` when ``2m < D/2`` and by
    ``x*angle[2m - D/2]`` otherwise (linvision.attn.rope). The fp32 product ``pos*angle`` is the
    same as the reference tables'; it is reduced to [-π, π] (Cody-Waite, 2π = C1 + C2 with C1 exact
    in few bits) so that the hardware (SFU) sin/cos stay accurate for large positions.
    """
    m = tl.arange(0, BD // 2)
    c = 2 * m
    is_row = c < D // 2
    idx = tl.where(is_row, c, c - D // 2)
    ang = tl.load(angle_ptr + idx, mask=c < D, other=0.0).to(tl.float32)
    ypos = (rows // width).to(tl.float32)
    xpos = (rows % width).to(tl.float32)
    pos = tl.where(is_row[None, :], ypos[:, None], xpos[:, None])
    theta = pos * ang[None, :]
    turns = tl.floor(theta * 0.15915494309189535 + 0.5)
    r = (theta - turns * 6.28125) - turns * 0.0019353071795864769
    cs = _cos(r)
    sn = _sin(r)
    if INVERSE:
        sn = -sn
    xe, xo = tl.split(tl.reshape(x, (BN, BD // 2, 2)))
    re = xe * cs - xo * sn
    ro = xo * cs + xe * sn
    return tl.reshape(tl.join(re, ro), (BN, BD))
