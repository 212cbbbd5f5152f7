"""How the Triton kernels choose their launch config (token-tile size ``BN``, tile order ``STRIDED``,
warps, pipeline stages), and the on-disk cache of tuned configs.

A config is chosen once per process for each (kernel, autotune-key values, argument dtypes); the key
holds the head-dim blocks, the options and the token-count class ``SIZE_CLASS`` (``policy.size_class``).
Three modes, set by ``LINVISION_TRITON_AUTOTUNE``:

* ``default`` (unset or ``default``): nothing is benchmarked. A config cached on disk for this GPU,
  Triton version, kernel source and key is used; otherwise the built-in :func:`default_config`, chosen
  from what won on the H100 (docs/kernels.md). A model's first forward at a new size costs its
  compiles only (seconds), not a tuning sweep (20–118 s).
* ``tune`` (``1`` or ``tune``): a key found in the cache is used as in ``default``; a key not in it is
  benchmarked on first use (first passes by ``triton.autotune``, second passes together with the pass
  they depend on, ``runtime.tune_after``) and the winner is added to the cache.
  :func:`linvision.attn.tune` runs one forward + backward of a model in this mode.
* ``fixed`` (``0`` or ``fixed``): one config for every kernel (BN 64, 4 warps, 1 stage; tile order from
  ``LINVISION_TRITON_TILE_ORDER``); the cache is neither read nor written. For tests (fast, deterministic
  compiles), and always under ``TRITON_INTERPRET=1``, whose autotuner cannot benchmark. Read when the
  kernels are imported: it also cuts the kernels' config lists to that one config.

The cache is one JSON file, ``$LINVISION_HOME/autotune/triton_configs.json``, or
``${XDG_CACHE_HOME:-~/.cache}/linvision/autotune/triton_configs.json`` without ``LINVISION_HOME``::

    {"format": "linvision.triton-configs/1",
     "entries": {"<gpu> | sm_90 | triton 3.6.0 | _state_kernel@<source hash> | BD=64,...,SIZE_CLASS=1 | bfloat16,...":
                 {"gpu": ..., "capability": "9.0", "triton": ..., "kernel": ..., "source": ..., "key": {...},
                  "dtypes": [...], "config": {"BN": 64, "STRIDED": false, "num_warps": 4, "num_stages": 1, ...}}}}

An entry is used only by the GPU model, compute capability, Triton version and kernel source it was tuned
with (the source hash: an edited kernel is tuned again). Every write re-reads the file, merges its
entries with this process's and replaces it atomically (``linvision.checkpoint.atomic_write``), so
concurrent processes lose at most each other's newest entries and never leave a truncated file. An
unreadable file is ignored with a warning (and replaced by the next write).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import triton

from .flags import INTERPRETING

__all__ = ["MODES", "autotune_mode", "tuning", "retuning", "on_forget", "select_config", "default_config", "fixed_config",
           "sweep_configs", "cache_path", "ConfigCache", "default_cache", "entry_key", "config_to_dict",
           "config_from_dict", "STATS"]

MODES = ("default", "tune", "fixed")
_ENV = "LINVISION_TRITON_AUTOTUNE"
_ENV_VALUES = {"": "default", "default": "default", "1": "tune", "tune": "tune", "0": "fixed", "fixed": "fixed"}
FORMAT = "linvision.triton-configs/1"
CACHE_FILE = "triton_configs.json"

# Tile order of the fixed config (tests run the suite once per order).
FIXED_TILE_ORDER = os.environ.get("LINVISION_TRITON_TILE_ORDER", "contiguous")
if FIXED_TILE_ORDER not in ("contiguous", "strided"):
    raise ValueError(f"LINVISION_TRITON_TILE_ORDER must be 'contiguous' or 'strided', got {FIXED_TILE_ORDER!r}")

# How many configs were chosen in this process, by where they came from: "tuned" (benchmarked),
# "cached" (read from the file), "default" (default_config), "fixed". Tests count benchmarks with it.
STATS: Dict[str, int] = {"tuned": 0, "cached": 0, "default": 0, "fixed": 0}

_override: Optional[Tuple[str, bool]] = None   # (mode, retune) while tuning() is active
# Called by tuning() with the config sources to forget: the launch runtime registers its forget_choices
# here when it is imported (it imports this module, so this module cannot import it).
_FORGET_HOOKS: List[Callable[[Tuple[str, ...]], None]] = []


def on_forget(hook: Callable[[Tuple[str, ...]], None]) -> None:
    """Register ``hook(sources)``, called when :func:`tuning` starts to forget the configs chosen from
    ``sources`` (``runtime.forget_choices``)."""
    _FORGET_HOOKS.append(hook)


def _mode_from_env() -> str:
    raw = os.environ.get(_ENV, "default").strip().lower()
    if raw not in _ENV_VALUES:
        raise ValueError(f"{_ENV} must be one of default, tune (or 1), fixed (or 0); got {raw!r}")
    return _ENV_VALUES[raw]


# The mode when the kernels were imported: "fixed" then also cuts their config lists to one config.
IMPORT_MODE = "fixed" if INTERPRETING else _mode_from_env()


def autotune_mode() -> str:
    """The mode in force now: ``"fixed"`` under the interpreter, else :func:`tuning`'s while it is active,
    else ``LINVISION_TRITON_AUTOTUNE``'s (read at each new key, so a process may change it between calls)."""
    if INTERPRETING:
        return "fixed"
    if _override is not None:
        return _override[0]
    return _mode_from_env()


def retuning() -> bool:
    """Whether :func:`tuning` was entered with ``retune=True`` (cached entries are benchmarked again)."""
    return _override is not None and _override[1]


@contextlib.contextmanager
def tuning(retune: bool = False) -> Iterator[None]:
    """Run the block in ``tune`` mode (process-wide: the autograd engine launches backward kernels from
    its own thread). Configs this process chose by default (and, with ``retune``, those read from the
    cache) are forgotten first, so that the block benchmarks them; afterwards the tuned configs stay in use."""
    global _override
    if INTERPRETING or IMPORT_MODE == "fixed":
        setting = "TRITON_INTERPRET=1" if INTERPRETING else _ENV + "=0"
        raise RuntimeError(f"cannot tune: the kernels were imported with one fixed config ({setting}); "
                           "unset it and start a new process")
    for hook in _FORGET_HOOKS:
        hook(("default", "cached") if retune else ("default",))
    previous, _override = _override, ("tune", retune)
    try:
        yield
    finally:
        _override = previous


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

def fixed_config() -> triton.Config:
    """The one config of ``fixed`` mode: BN 64, 4 warps, 1 stage, tile order ``LINVISION_TRITON_TILE_ORDER``."""
    return triton.Config({"BN": 64, "STRIDED": FIXED_TILE_ORDER == "strided"}, num_warps=4, num_stages=1)


def sweep_configs(kind: str) -> List[triton.Config]:
    """The configs ``tune`` mode benchmarks for a kernel kind (``"reduce"``: state pass and q-side backward;
    ``"token"``: output pass and k/v-side backward): token-tile size, warps, stages, tile order."""
    if kind == "reduce":
        # 2-warp configs win for narrow heads: the q-side backward at d = 32 takes 35 µs with (32, 2, 1)
        # against 46 µs with 4 warps (H100, (32,3,3136,32) bf16; docs/kernels.md).
        shapes = [(64, 4, 1), (128, 4, 1), (128, 8, 1), (64, 8, 2), (64, 2, 1), (32, 4, 1), (32, 2, 1)]
        strided = [(64, 4, 1), (32, 2, 1)]
    elif kind == "token":
        shapes = [(64, 4, 1), (128, 4, 1), (128, 8, 1), (256, 8, 1)]
        strided = [(64, 4, 1)]
    else:
        raise ValueError(f"kernel kind must be 'reduce' or 'token', got {kind!r}")
    return ([triton.Config({"BN": bn, "STRIDED": False}, num_warps=w, num_stages=s) for bn, w, s in shapes]
            + [triton.Config({"BN": bn, "STRIDED": True}, num_warps=w, num_stages=s) for bn, w, s in strided])


def default_config(kernel: str, key: Mapping[str, Any]) -> triton.Config:
    """The config a kernel runs with when nothing is cached and nothing is tuned.

    ``kernel``: the kernel function's name; ``key``: its autotune-key values (``BD``, the head-dim block,
    and ``SIZE_CLASS``: 0 for N ≤ 1024, 1 to 8192, 2 to 65536, 3 above). Every result is one of
    :func:`sweep_configs`. From the autotuner's picks and the probes on the H100 (bf16, docs/kernels.md):

    * tile order: strided where the runs are long (N > 65536 for every kernel, N > 8192 for the state
      pass: 38.6 vs 42.4 µs at (2,4,50176,64)); contiguous below (the output pass at (2,4,50176,64) and the
      state pass at (32,3,3136,32) are faster contiguous);
    * state pass: BN 64 with 4 warps, except BN 32 with 2 warps (strided) for narrow heads at N ≤ 1024;
    * output pass: BN 64, 4 warps, except BN 128 for narrow heads (d ≤ 32) at 1024 < N ≤ 8192 (whole
      forward 33.4 vs 35.5 µs at (32,3,3136,32));
    * q-side backward: BN 32 with 4 warps (37.1 µs at (8,4,3136,64)), 2 warps for d ≤ 32 (35 vs 46 µs at
      (32,3,3136,32)); BN 64 strided above N = 65536;
    * k/v-side backward: BN 64, 4 warps.
    """
    bd = int(key.get("BD", 64))
    size = int(key.get("SIZE_CLASS", 1))
    narrow = bd <= 32
    bn, strided, warps = 64, size >= 3, 4
    if kernel == "_state_kernel":
        if size >= 2:
            strided = True
        elif size == 0 and narrow:
            bn, strided, warps = 32, True, 2
    elif kernel == "_output_kernel":
        if narrow and size == 1:
            bn = 128
    elif kernel == "_bwd_q_kernel":
        if size < 3:
            bn, warps = 32, 2 if narrow else 4
    return triton.Config({"BN": bn, "STRIDED": strided}, num_warps=warps, num_stages=1)


_CONFIG_FIELDS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def config_to_dict(config: triton.Config) -> Dict[str, Any]:
    """A config as JSON-able fields: its kernel kwargs plus num_warps, num_stages (and num_ctas, maxnreg if set)."""
    out = dict(config.kwargs)
    for name in _CONFIG_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            out[name] = value
    return out


def config_from_dict(fields: Mapping[str, Any], kwarg_names: Sequence[str]) -> triton.Config:
    """Inverse of :func:`config_to_dict`; ``ValueError`` unless the kwargs are exactly ``kwarg_names`` with
    int/bool values and ``num_warps``/``num_stages`` are positive ints."""
    if not isinstance(fields, Mapping):
        raise ValueError(f"config is a {type(fields).__name__}, not an object")
    kwargs = {k: v for k, v in fields.items() if k not in _CONFIG_FIELDS}
    if set(kwargs) != set(kwarg_names):
        raise ValueError(f"config has fields {sorted(kwargs)}, the kernel takes {sorted(kwarg_names)}")
    if not all(isinstance(v, (int, bool)) for v in kwargs.values()):
        raise ValueError(f"config values must be ints or booleans: {kwargs}")
    options = {name: fields[name] for name in _CONFIG_FIELDS if fields.get(name) is not None}
    for name in ("num_warps", "num_stages"):
        if not isinstance(options.get(name), int) or isinstance(options.get(name), bool) or options[name] < 1:
            raise ValueError(f"config needs a positive integer {name}, got {fields.get(name)!r}")
    return triton.Config(kwargs, **options)


# ---------------------------------------------------------------------------------------------
# The cache file
# ---------------------------------------------------------------------------------------------

def cache_path() -> Path:
    """``$LINVISION_HOME/autotune/triton_configs.json``, else under ``${XDG_CACHE_HOME:-~/.cache}/linvision``
    (read at each call)."""
    home = os.environ.get("LINVISION_HOME")
    if home:
        root = Path(home).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "linvision"
    return root / "autotune" / CACHE_FILE


@functools.lru_cache(maxsize=None)
def source_hash(fn) -> str:
    """First 12 hex digits of the sha256 of a kernel function's source (``JITFunction.src``, or the wrapped
    Python function's under the interpreter)."""
    src = getattr(fn, "src", None) or inspect.getsource(getattr(fn, "fn", fn))
    return hashlib.sha256(src.encode()).hexdigest()[:12]


def entry_key(gpu: str, capability: str, triton_version: str, kernel: str, source: str,
              key: Mapping[str, Any], dtypes: Sequence[str]) -> str:
    """The cache's key text for one choice: GPU model, compute capability (``"9.0"``), Triton version,
    kernel name and source hash, autotune-key values (in the kernel's key order) and argument dtypes."""
    values = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in key.items())
    return " | ".join((gpu, f"sm_{capability.replace('.', '')}", f"triton {triton_version}", f"{kernel}@{source}",
                       values, ",".join(dtypes)))


def entry(gpu: str, capability: str, triton_version: str, kernel: str, source: str, key: Mapping[str, Any],
          dtypes: Sequence[str], config: triton.Config) -> Tuple[str, Dict[str, Any]]:
    """``(key text, entry)`` for storing ``config`` (the entry repeats the key's parts, for people reading it)."""
    key = {k: (bool(v) if isinstance(v, bool) else v) for k, v in key.items()}
    text = entry_key(gpu, capability, triton_version, kernel, source, key, dtypes)
    return text, {"gpu": gpu, "capability": capability, "triton": triton_version, "kernel": kernel,
                  "source": source, "key": key, "dtypes": list(dtypes), "config": config_to_dict(config)}


class ConfigCache:
    """The cache file at ``path``: read once (lazily), merged and rewritten atomically on each store."""

    def __init__(self, path):
        self.path = Path(path)
        self._entries: Optional[Dict[str, Any]] = None
        self._warned = False

    def _read(self) -> Dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as e:
            self._warn(f"cannot read it ({e})")
            return {}
        try:
            data = json.loads(text)
        except ValueError as e:
            self._warn(f"not valid JSON ({e})")
            return {}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
            self._warn(f"not a {FORMAT} file")
            return {}
        return data["entries"]

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"ignoring the Triton config cache {self.path}: {reason}; the next tuned config replaces it",
                          RuntimeWarning, stacklevel=3)

    def entries(self) -> Dict[str, Any]:
        """Key text -> entry, as read from the file (``{}`` if it is missing or unreadable)."""
        if self._entries is None:
            self._entries = self._read()
        return self._entries

    def lookup(self, key_text: str, kwarg_names: Sequence[str]) -> Optional[triton.Config]:
        """The cached config for ``key_text``, or None (absent, or malformed: then with a warning)."""
        found = self.entries().get(key_text)
        if found is None:
            return None
        try:
            return config_from_dict(found.get("config") if isinstance(found, dict) else found, kwarg_names)
        except ValueError as e:
            warnings.warn(f"ignoring a malformed entry of the Triton config cache {self.path} ({key_text}): {e}",
                          RuntimeWarning, stacklevel=2)
            return None

    def store(self, key_text: str, value: Dict[str, Any]) -> Path:
        """Add one entry: the file is re-read, merged with this process's entries and replaced atomically."""
        from linvision.checkpoint import write_json
        merged = {**self._read(), **(self._entries or {}), key_text: value}
        self._entries = merged
        return write_json({"format": FORMAT, "entries": merged}, self.path)


_CACHES: Dict[Path, ConfigCache] = {}


def default_cache() -> ConfigCache:
    """The :class:`ConfigCache` at :func:`cache_path` (one object per path in a process)."""
    path = cache_path()
    if path not in _CACHES:
        _CACHES[path] = ConfigCache(path)
    return _CACHES[path]


def select_config(kernel: str, source: str, key: Mapping[str, Any], dtypes: Sequence[str], kwarg_names: Sequence[str],
                  device: Tuple[str, str], tune=None, cache: Optional[ConfigCache] = None,
                  mode: Optional[str] = None) -> Tuple[triton.Config, str]:
    """The config for one (kernel, key, dtypes) on ``device`` (``(GPU name, compute capability)``), and where
    it came from: ``"fixed"``, ``"cached"``, ``"tuned"`` or ``"default"``.

    ``fixed`` mode: :func:`fixed_config`. Otherwise a cached entry if there is one (unless retuning); else in
    ``tune`` mode ``tune()`` (the caller's benchmark, returning the winner; None when it cannot benchmark now,
    e.g. during CUDA-graph capture), whose result is stored; else :func:`default_config`.
    """
    mode = mode or autotune_mode()
    if mode == "fixed":
        return fixed_config(), "fixed"
    cache = cache if cache is not None else default_cache()
    gpu, capability = device
    text = entry_key(gpu, capability, triton.__version__, kernel, source, key, dtypes)
    if not retuning():
        found = cache.lookup(text, kwarg_names)
        if found is not None:
            return found, "cached"
    if mode == "tune" and tune is not None:
        config = tune()
        try:
            cache.store(text, entry(gpu, capability, triton.__version__, kernel, source, key, dtypes, config)[1])
        except OSError as e:   # a read-only or full disk must not stop the forward
            warnings.warn(f"could not write the Triton config cache {cache.path}: {e}", RuntimeWarning, stacklevel=2)
        return config, "tuned"
    return default_config(kernel, key), "default"
