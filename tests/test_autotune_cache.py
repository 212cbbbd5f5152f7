"""How the Triton kernels choose their configs without tuning, and the on-disk cache of tuned configs
(``linvision.attn.ops.autotune``, ``runtime.launch``).

On CPU: the cache file's round trip, merge, corrupt-file and keying rules, the selection logic (cached
beats default, default when nothing is cached, tune mode benchmarks once and stores), and a cached
config really launched by the interpreter. ``@pytest.mark.cuda``: fresh processes on the GPU — the
default mode never benchmarks; ``linvision.attn.tune`` writes the cache and a second process uses it
without benchmarking (counted, not timed).
"""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from linvision.attn.ops import autotune, runtime

H100 = ("NVIDIA H100 80GB HBM3", "9.0")
KEY = {"BD": 64, "BDV": 64, "FEATURE": 2, "HAS_W": False, "SIZE_CLASS": 1}
DTYPES = ["torch.bfloat16", "torch.bfloat16"]
KWARGS = ["BN", "STRIDED"]


def _config(bn=32, strided=True, warps=2, stages=1):
    import triton
    return triton.Config({"BN": bn, "STRIDED": strided}, num_warps=warps, num_stages=stages)


def _same(a, b) -> bool:
    return autotune.config_to_dict(a) == autotune.config_to_dict(b)


def _select(cache, mode="default", device=H100, tune=None, kernel="_state_kernel", key=KEY):
    return autotune.select_config(kernel, "abc123", key, DTYPES, KWARGS, device, tune=tune, cache=cache, mode=mode)


def _store(cache, config, device=H100, triton_version=None, kernel="_state_kernel", key=KEY):
    import triton
    text, value = autotune.entry(*device, triton_version or triton.__version__, kernel, "abc123", key, DTYPES, config)
    cache.store(text, value)
    return text


def test_cache_round_trip_and_merge(tmp_path):
    path = tmp_path / "autotune" / autotune.CACHE_FILE
    first, second = autotune.ConfigCache(path), autotune.ConfigCache(path)
    second.entries()                                   # read while the file did not exist yet
    text_a = _store(first, _config(32, True, 2))
    text_b = _store(second, _config(128, False, 8), key={**KEY, "SIZE_CLASS": 3})
    data = json.loads(path.read_text())
    assert data["format"] == autotune.FORMAT and set(data["entries"]) == {text_a, text_b}, "stores were not merged"
    assert data["entries"][text_a]["config"] == {"BN": 32, "STRIDED": True, "num_warps": 2, "num_stages": 1,
                                                 "num_ctas": 1}
    assert not list(path.parent.glob(".*.tmp")), "a temporary file was left behind"
    fresh = autotune.ConfigCache(path)                  # a later process
    assert _same(fresh.lookup(text_a, KWARGS), _config(32, True, 2))
    assert _same(fresh.lookup(text_b, KWARGS), _config(128, False, 8))
    assert fresh.lookup(text_a.replace("SIZE_CLASS=1", "SIZE_CLASS=2"), KWARGS) is None


def test_corrupt_file_is_ignored_with_a_warning_and_replaced(tmp_path):
    path = tmp_path / autotune.CACHE_FILE
    path.write_text('{"format": "linvision.triton-configs/1", "entries": {"trunc')
    cache = autotune.ConfigCache(path)
    with pytest.warns(RuntimeWarning, match="ignoring the Triton config cache .*not valid JSON"):
        config, source = _select(cache)
    assert source == "default" and _same(config, autotune.default_config("_state_kernel", KEY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # warned once per file, not per lookup
        assert _select(cache)[1] == "default"
    _store(cache, _config())
    assert json.loads(path.read_text())["format"] == autotune.FORMAT
    path.write_text(json.dumps({"format": "something else", "entries": {}}))
    with pytest.warns(RuntimeWarning, match="not a linvision.triton-configs/1 file"):
        assert autotune.ConfigCache(path).entries() == {}


def test_malformed_entry_is_ignored_with_a_warning(tmp_path):
    cache = autotune.ConfigCache(tmp_path / autotune.CACHE_FILE)
    text = _store(cache, _config())
    bad = {"BN": 64, "STRIDED": False, "TILE": 3, "num_warps": 4, "num_stages": 1}
    cache.store(text, {"config": bad})
    with pytest.warns(RuntimeWarning, match="malformed entry.*fields"):
        assert _select(autotune.ConfigCache(cache.path))[1] == "default"
    for fields, message in (({"BN": 64, "STRIDED": False, "num_stages": 1}, "num_warps"),
                            ({"BN": "64", "STRIDED": False, "num_warps": 4, "num_stages": 1}, "ints or booleans"),
                            ([64], "not an object")):
        with pytest.raises(ValueError, match=message):
            autotune.config_from_dict(fields, KWARGS)


def test_entries_of_another_gpu_or_triton_version_are_not_used(tmp_path):
    cache = autotune.ConfigCache(tmp_path / autotune.CACHE_FILE)
    _store(cache, _config(32, True, 2), device=("NVIDIA A100-SXM4-80GB", "8.0"))
    _store(cache, _config(128, False, 8), triton_version="0.0.1")
    _store(cache, _config(128, True, 4), device=("NVIDIA H100 80GB HBM3", "9.1"))
    config, source = _select(cache)
    assert source == "default" and _same(config, autotune.default_config("_state_kernel", KEY))
    other = autotune.select_config("_state_kernel", "other-source", KEY, DTYPES, KWARGS,
                                   ("NVIDIA A100-SXM4-80GB", "8.0"), cache=cache, mode="default")
    assert other[1] == "default", "an entry tuned for another kernel source was used"


def test_selection_cached_beats_default_and_tune_mode_benchmarks_once(tmp_path, monkeypatch):
    path = tmp_path / autotune.CACHE_FILE
    calls = []

    def bench():
        calls.append(1)
        return _config(128, True, 4)
    # default mode: no benchmark, the built-in default, nothing written
    config, source = _select(autotune.ConfigCache(path), tune=bench)
    assert (source, calls, path.exists()) == ("default", [], False)
    # tune mode: benchmarks the missing key once and stores the winner
    cache = autotune.ConfigCache(path)
    config, source = _select(cache, mode="tune", tune=bench)
    assert source == "tuned" and _same(config, _config(128, True, 4)) and len(calls) == 1 and path.exists()
    # a later process, in either mode: the cached config, no benchmark
    for mode in ("default", "tune"):
        config, source = _select(autotune.ConfigCache(path), mode=mode, tune=bench)
        assert source == "cached" and _same(config, _config(128, True, 4)) and len(calls) == 1
    # tune mode that cannot benchmark now (CUDA-graph capture): the default, nothing stored
    other_key = {**KEY, "SIZE_CLASS": 0}
    assert _select(autotune.ConfigCache(path), mode="tune", tune=None, key=other_key)[1] == "default"
    # fixed mode ignores the cache
    config, source = _select(autotune.ConfigCache(path), mode="fixed", tune=bench)
    assert source == "fixed" and _same(config, autotune.fixed_config()) and len(calls) == 1
    # retuning benchmarks a cached key again and overwrites its entry
    monkeypatch.setattr(autotune, "_override", ("tune", True))
    config, source = _select(autotune.ConfigCache(path), mode="tune", tune=lambda: _config(64, False, 4))
    assert source == "tuned" and _same(autotune.ConfigCache(path).lookup(
        autotune.entry_key(*H100, __import__("triton").__version__, "_state_kernel", "abc123", KEY, DTYPES), KWARGS),
        _config(64, False, 4))


def test_default_configs_are_sweep_configs():
    """Every default is one of the configs tune mode may pick (all built on the H100), per kernel kind."""
    kinds = {"_state_kernel": "reduce", "_bwd_q_kernel": "reduce", "_output_kernel": "token",
             "_bwd_kv_kernel": "token"}
    for kernel, kind in kinds.items():
        sweep = [autotune.config_to_dict(c) for c in autotune.sweep_configs(kind)]
        for bd in (16, 32, 64, 128):
            for size in range(4):
                config = autotune.default_config(kernel, {"BD": bd, "SIZE_CLASS": size})
                assert autotune.config_to_dict(config) in sweep, (kernel, bd, size, config)
    assert autotune.default_config("_bwd_q_kernel", {"BD": 32, "SIZE_CLASS": 1}).num_warps == 2
    assert autotune.default_config("_state_kernel", {"BD": 64, "SIZE_CLASS": 2}).kwargs["STRIDED"]
    assert not autotune.default_config("_output_kernel", {"BD": 64, "SIZE_CLASS": 1}).kwargs["STRIDED"]


def test_mode_names_and_cache_location(monkeypatch, tmp_path):
    monkeypatch.setattr(autotune, "INTERPRETING", False)
    for raw, mode in (("", "default"), ("default", "default"), ("1", "tune"), ("TUNE", "tune"), ("0", "fixed"),
                      ("fixed", "fixed")):
        monkeypatch.setenv("LINVISION_TRITON_AUTOTUNE", raw)
        assert autotune.autotune_mode() == mode
    monkeypatch.delenv("LINVISION_TRITON_AUTOTUNE")
    assert autotune.autotune_mode() == "default"
    monkeypatch.setenv("LINVISION_TRITON_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="LINVISION_TRITON_AUTOTUNE must be one of default, tune"):
        autotune.autotune_mode()
    monkeypatch.setenv("LINVISION_HOME", str(tmp_path / "home"))
    assert autotune.cache_path() == tmp_path / "home" / "autotune" / "triton_configs.json"
    monkeypatch.delenv("LINVISION_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_path() == tmp_path / "xdg" / "linvision" / "autotune" / "triton_configs.json"


@pytest.mark.skipif(not runtime.INTERPRETING, reason="the interpreter's fixed mode")
def test_tuning_refused_under_the_interpreter():
    with pytest.raises(RuntimeError, match="cannot tune: the kernels were imported with one fixed config"):
        with autotune.tuning():
            pass


def test_launch_uses_a_cached_config_and_defaults_elsewhere(tmp_path, monkeypatch):
    """The real launch path (interpreter on CPU, or the GPU) in default mode: the first calls take the
    defaults; after one kernel's key is cached, a fresh choice takes the cached config for it (no benchmark)
    and the default for the others, and the values still match the reference."""
    from linvision.attn.core import linear_attention
    from linvision.attn.ops.naive import linear_attention_torch
    monkeypatch.setenv("LINVISION_HOME", str(tmp_path))
    monkeypatch.setattr(autotune, "autotune_mode", lambda: "default")
    everything = ("default", "cached", "tuned", "fixed")
    runtime.forget_choices(everything)
    monkeypatch.setattr(autotune, "STATS", dict.fromkeys(autotune.STATS, 0))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, v = (torch.randn(1, 2, 45, 16, device=device, requires_grad=True) for _ in range(3))

    def run():
        out = linear_attention(q, k, v, backend="triton")
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return [out] + list(grads)
    try:
        first = run()
        assert set(runtime._SOURCES.values()) == {"default"} and autotune.STATS["default"] == 4
        ((key, _),) = [(key, cfg) for key, cfg in runtime._TUNED.items()
                       if runtime._KERNELS[key[0]].fn.__name__ == "_state_kernel"]
        kernel = runtime._KERNELS[key[0]]
        cached = _config(32, False, 2)
        text, value = autotune.entry(*runtime.current_device_identity(), __import__("triton").__version__,
                                     "_state_kernel", autotune.source_hash(kernel.fn), dict(zip(kernel.keys, key[1])),
                                     key[2], cached)
        autotune.default_cache().store(text, value)
        assert autotune.cache_path().exists()
        runtime.forget_choices(everything)
        second = run()
        by_kernel = {runtime._KERNELS[key[0]].fn.__name__: source for key, source in runtime._SOURCES.items()}
        assert by_kernel == {"_state_kernel": "cached", "_output_kernel": "default", "_bwd_q_kernel": "default",
                             "_bwd_kv_kernel": "default"}
        assert _same(runtime._TUNED[key], cached) and autotune.STATS["tuned"] == 0
        ref_in = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ref = linear_attention_torch(*ref_in)
        ref_grads = torch.autograd.grad(ref, ref_in, torch.ones_like(ref))
        for a, b, r in zip(first, second, [ref] + list(ref_grads)):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * r.abs().max().item())
            torch.testing.assert_close(b, r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    finally:
        runtime.forget_choices(everything)


# ---------------------------------------------------------------------------------------------
# GPU: fresh processes (the mode is read when the kernels are imported)
# ---------------------------------------------------------------------------------------------

_PROBE = r"""
import json, sys, time
import torch, timm
import linvision
from linvision.attn.ops import autotune, linear_attn_bwd, linear_attn_fwd, runtime
action = sys.argv[1]
model = timm.create_model("linvit_s").cuda()
x = torch.randn(2, 3, 224, 224, device="cuda")
start = time.perf_counter()
with torch.autocast("cuda", dtype=torch.bfloat16):
    if action == "tune":
        report = linvision.attn.tune(model, x)
    else:
        out = model(x)
        out.float().sum().backward()
        report = {}
torch.cuda.synchronize()
kernels = [linear_attn_fwd._state_kernel, linear_attn_fwd._output_kernel, linear_attn_bwd._bwd_q_kernel,
           linear_attn_bwd._bwd_kv_kernel]
print(json.dumps({"stats": autotune.STATS, "report": report, "seconds": time.perf_counter() - start,
                  "triton_benchmarked_keys": sum(len(k.cache) for k in kernels),
                  "sources": sorted(set(runtime._SOURCES.values()))}))
"""


def _probe(action: str, home: Path, mode: str) -> dict:
    env = {**os.environ, "LINVISION_HOME": str(home), "LINVISION_TRITON_AUTOTUNE": mode}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _PROBE, action], env=env, capture_output=True, text=True,
                          timeout=900, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.cuda
def test_default_mode_never_benchmarks_gpu(tmp_path):
    """A fresh process, nothing cached: linvit_s forward + backward at 224 chooses every config by default,
    benchmarks none (neither our tune_after nor triton.autotune) and writes no cache."""
    result = _probe("run", tmp_path, "default")
    print(json.dumps(result))
    assert result["stats"]["tuned"] == 0 and result["stats"]["default"] > 0, result
    assert result["triton_benchmarked_keys"] == 0 and result["sources"] == ["default"], result
    assert not (tmp_path / "autotune" / autotune.CACHE_FILE).exists()


@pytest.mark.cuda
def test_tune_writes_the_cache_and_a_second_process_uses_it_gpu(tmp_path):
    """``linvision.attn.tune`` in one process benchmarks every key of linvit_s at 224 (forward + backward)
    and writes the cache; a second process in the default mode takes every config from it, benchmarking
    nothing; a third tune call finds everything cached."""
    tuned = _probe("tune", tmp_path, "default")
    print(json.dumps(tuned))
    assert tuned["report"]["tuned"] > 0 and tuned["report"]["default"] == 0, tuned
    path = tmp_path / "autotune" / autotune.CACHE_FILE
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == tuned["report"]["tuned"], entries.keys()
    assert {e["kernel"] for e in entries.values()} == {"_state_kernel", "_output_kernel", "_bwd_q_kernel",
                                                       "_bwd_kv_kernel"}
    reused = _probe("run", tmp_path, "default")
    print(json.dumps(reused))
    assert reused["stats"]["tuned"] == 0 and reused["triton_benchmarked_keys"] == 0, reused
    assert reused["sources"] == ["cached"] and reused["stats"]["cached"] == len(entries), reused
    again = _probe("tune", tmp_path, "tune")
    assert again["report"]["tuned"] == 0 and again["report"]["cached"] == len(entries), again
