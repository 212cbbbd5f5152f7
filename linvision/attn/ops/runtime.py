"""Launching the linear-attention kernels with the least host work.

* config choice: once per (kernel, autotune-key values, dtypes), by the mode in force (:mod:`.autotune`):
  the fixed config, a cached one, the built-in default, or benchmarked; second passes are tuned together
  with the pass they depend on (:func:`tune_after`);
* direct launch: each compiled kernel is kept and later launched without ``JITFunction.run``
  (:func:`launch`, :class:`Direct`), and each host function keeps one :class:`KernelCall` per pass
  signature (:class:`PlanCache`, :func:`tensor_key`, :func:`policy_key`);
* dependent launch: on sm_90+ second passes start as programmatic dependents of the first
  (:func:`dependent_launch`, :func:`dependent_consts`; the in-kernel side is in :mod:`.jit`).
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Optional

import torch
import triton
import triton.compiler.errors
import triton.runtime.errors

from . import autotune, policy
from .flags import INTERPRETING

__all__ = ["DIRECT_LAUNCH", "DEPENDENT_LAUNCH", "dependent_launch", "dependent_consts", "Direct", "launch", "launch_plain",
           "tune_after", "device_identity", "current_device_identity", "forget_choices", "tensor_key",
           "policy_key", "KernelCall", "PlanCache"]

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
    return policy.cuda_properties(device).major >= 9


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
    handling (tens of µs per launch on an H100 host; these kernels run for ten)."""

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


def _replay_time(fn: Callable[[], object], reps: int = 25) -> float:
    """Median device time (ms) of ``fn`` replayed from a CUDA graph, L2 evicted before each replay by reading
    256 MB: how :func:`tune_after` ranks configs. The graph keeps host time out (these passes run for tens of
    µs, about what their launches take on the host); a read leaves no dirty lines for the timed call to write
    back (``do_bench``'s ``zero_()`` does). ``linvision.benchmark.replay_time`` measures the same way for the
    tools; the runtime keeps its own copy because the attention core imports nothing from the layers above it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()                                 # compiles, settles the allocator
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    flush = torch.empty(64 << 20, dtype=torch.int32, device=torch.cuda.current_device())
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.max()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[(len(times) - 1) // 2]


def tune_after(kernel, grid, args: tuple, consts: dict, preceding_pass: Callable[[], object],
               bench: Callable[[Callable[[], object]], float] = _replay_time):
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
    props = policy.device_properties(device_index)
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


autotune.on_forget(forget_choices)


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
        tail = _keep_tail(kernel.fn, len(args), kwargs)
        if tail is not None:
            if len(_COMPILED) >= _COMPILED_MAX:
                _COMPILED.clear()
            _COMPILED[key] = (compiled, tail, {**consts, **config.kwargs})
    return None


def _keep_tail(jit_fn, n_args: int, values: dict) -> Optional[tuple]:
    """The constexpr values that follow a kernel's ``n_args`` runtime arguments, in signature order (what a
    kept ``CompiledKernel`` takes after them), or None when ``values`` lacks one (the kernel is not kept).
    Binds the driver's stream getter that :class:`Direct` launches on."""
    global _current_stream
    names = jit_fn.arg_names[n_args:]
    if not all(name in values for name in names):
        return None
    if _current_stream is None:
        _current_stream = triton.runtime.driver.active.get_current_stream
    return tuple(values[name] for name in names)


def launch_plain(kernel, grid: tuple, tensors: tuple, scalars: tuple, consts: dict) -> Optional[Direct]:
    """Launch a plain ``@triton.jit`` kernel (no config choice: its constexprs are all in ``consts``) through
    ``JITFunction.run`` and return a :class:`Direct` that launches the same compiled kernel, grid and scalars
    on other tensors of the same specialisation (None under the interpreter or without direct launch).
    For kernels outside this package (``linvision.ops``) that key their launches themselves."""
    compiled = kernel[grid](*tensors, *scalars, **consts)
    if not DIRECT_LAUNCH or compiled is None:
        return None
    tail = _keep_tail(kernel, len(tensors) + len(scalars), consts)
    if tail is None:
        return None
    device = triton.runtime.driver.active.get_current_device()
    return Direct(compiled, (tuple(grid) + (1, 1))[:3], scalars + tail, device)


def tensor_key(*tensors) -> tuple:
    """What a pass's launch depends on per tensor argument (None stays None): shape, strides, dtype,
    device and whether the data pointer is 16-byte aligned (Triton specialises pointers on it)."""
    return tuple(None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0)
                 for t in tensors)


def policy_key() -> tuple:
    """The launch-policy settings a pass's grid and buffers depend on (tests and sweeps change them)."""
    return (policy.FORCE_SPLITS, policy.REDUCE_PROGRAMS_PER_SM, policy.REDUCE_MIN_TOKENS,
            policy.REDUCE_SPLITS_PER_COPY, policy.TOKEN_PROGRAMS_PER_SM, DEPENDENT_LAUNCH)


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

