"""The whole-model benchmark (``linvision/benchmark.py``, ``tools/benchmark.py``) on CPU at tiny sizes:
the JSON-line schema, both modes, the reference ratios, cold-start lines, out-of-memory and failing cases
recorded while the sweep goes on, the plot, and the profiler's kernel families. Timings are printed,
never asserted."""
import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from linvision import benchmark

ROOT = Path(__file__).resolve().parents[1]
REF = "vit_tiny_patch16_224"
ENV_FIELDS = ("device", "torch", "timm", "triton", "linvision", "cuda", "triton_autotune")


@pytest.fixture(scope="module")
def sweep():
    """linvit_t and a timm ViT (fixed input size: rebuilt with img_size) at two resolutions, both modes,
    compared with the ViT, with cold-start lines."""
    opts = benchmark.Options(mode="both", amp=False, warmup=0, iters=2, device="cpu", cold_start=True, compare=REF)
    emitted = []
    rows = benchmark.run(["linvit_t", REF], [((32, 32), 2), ((48, 64), 1)], opts, emit=emitted.append)
    assert emitted == rows
    return rows


def _cases(rows, **match):
    return [r for r in rows if r["kind"] == "case" and all(r[k] == v for k, v in match.items())]


def test_case_lines_schema(sweep):
    cases = _cases(sweep)
    assert len(cases) == 2 * 2 * 2                            # models × resolutions × modes
    for r in cases:
        json.dumps(r)                                          # every line is plain JSON
        assert r["status"] == "ok", r
        assert r["mode"] in ("infer", "train") and r["batch_size"] in (1, 2)
        assert r["img_per_s"] > 0 and r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["reps"] == 2
        assert r["img_per_s"] == pytest.approx(r["batch_size"] / (r["ms_median"] / 1e3))
        assert r["peak_mem_mib"] is None and r["cuda_graph"] is False   # CPU
        assert r["params"] > 0 and r["gmacs"] > 0 and r["tflops"] > 0
        assert all(r[k] is not None for k in ("device", "torch", "timm", "linvision")) and set(ENV_FIELDS) <= set(r)
        assert set(r["options"]) == {f.name for f in dataclasses.fields(benchmark.Options)}
        assert r["options"]["compare"] == REF and r["options"]["amp"] is False
    for model in ("linvit_t", REF):
        small, large = (_cases(sweep, model=model, mode="infer", img_size=s)[0] for s in ([32, 32], [48, 64]))
        assert large["gmacs"] > small["gmacs"], "MACs not counted at the case's resolution"
    # linvision's models take any size with the same weights; timm's ViT is rebuilt with img_size
    # (its position embedding grows with the token count).
    assert len({r["params"] for r in _cases(sweep, model="linvit_t")}) == 1
    assert len({r["params"] for r in _cases(sweep, model=REF)}) == 2


def test_reference_ratios_in_the_same_process(sweep):
    cases = _cases(sweep)
    assert cases[0]["model"] == REF, "the reference is measured first at each resolution"
    for r in cases:
        ref = _cases(sweep, model=REF, img_size=r["img_size"], batch_size=r["batch_size"], mode=r["mode"])[0]
        if r["model"] == REF:
            assert "speedup_vs_ref" not in r
            continue
        assert r["ref_model"] == REF and r["ref_img_per_s"] == ref["img_per_s"]
        assert r["speedup_vs_ref"] == pytest.approx(r["img_per_s"] / ref["img_per_s"])
        assert r["mem_vs_ref"] is None                          # no memory figures on CPU
        assert sweep.index(ref) < sweep.index(r)
    table = benchmark.summary(sweep)
    assert table.count("\n") == 2 + len(cases) - 1 and "| linvit_t | 48x64 | 1 | train | ok |" in table


def test_cold_start_lines(sweep):
    cold = [r for r in sweep if r["kind"] == "cold_start"]
    assert {(r["model"], tuple(r["img_size"])) for r in cold} == {
        (m, s) for m in ("linvit_t", REF) for s in ((32, 32), (48, 64))}
    for r in cold:
        assert r["status"] == "ok" and r["first_forward_s"] > 0 and r["first_train_step_s"] > 0, r
        first_case = _cases(sweep, model=r["model"], img_size=r["img_size"])[0]
        assert sweep.index(r) < sweep.index(first_case)


def test_plot_from_rows_and_from_a_saved_file(sweep, tmp_path):
    out = benchmark.plot(sweep, tmp_path / "speed.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "results.jsonl"
    saved.write_text("\n".join(json.dumps(r) for r in sweep) + "\n")
    assert benchmark.read_jsonl(saved) == json.loads(json.dumps(sweep))
    assert benchmark.main(["--plot-from", str(saved), str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        benchmark.plot([r for r in sweep if r["kind"] == "cold_start"], tmp_path / "none.png")


class _Tiny(nn.Module):
    """A small classifier whose forward fails as the test asks: out of memory from batch 4, a plain error
    when built with ``broken``."""

    def __init__(self, broken=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 10)
        self.broken = broken

    def forward(self, x):
        if self.broken:
            raise ValueError("expected an image batch of shape (B, 3, H, W)\nsecond line not reported")
        if x.shape[0] >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return self.head(self.conv(x).mean((2, 3)))

    def set_grad_checkpointing(self, enable=True):
        pass


def test_out_of_memory_and_failures_are_recorded_and_the_sweep_goes_on(monkeypatch):
    real_build = benchmark.build_model
    freed = []

    def build(name, size, extra):
        if name.startswith("tiny"):
            return _Tiny(broken=name == "tiny_broken")
        return real_build(name, size, extra)
    monkeypatch.setattr(benchmark, "build_model", build)
    monkeypatch.setattr(benchmark, "free_memory", lambda device: freed.append(device))
    opts = benchmark.Options(mode="both", amp=False, warmup=1, iters=1, device="cpu", grad_checkpointing=True)
    rows = benchmark.run(["tiny", "no_such_model_xyz", "tiny_broken"], benchmark.plan_cases([], ["32:4", "32:1"]),
                         opts, emit=lambda row: None)
    got = [(r["model"], r["batch_size"], r["mode"], r["status"]) for r in rows]
    assert got == [("tiny", 4, "infer", "oom"), ("tiny", 4, "train", "oom"), ("tiny", 1, "infer", "ok"),
                   ("tiny", 1, "train", "ok"),
                   ("no_such_model_xyz", 4, "infer", "error"), ("no_such_model_xyz", 4, "train", "error"),
                   ("no_such_model_xyz", 1, "infer", "error"), ("no_such_model_xyz", 1, "train", "error"),
                   ("tiny_broken", 4, "infer", "error"), ("tiny_broken", 4, "train", "error"),
                   ("tiny_broken", 1, "infer", "error"), ("tiny_broken", 1, "train", "error")]
    assert rows[0]["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert "img_per_s" not in rows[0] and rows[0]["peak_mem_mib"] is None
    assert "no_such_model_xyz" in rows[4]["error"] and "\n" not in rows[4]["error"]
    assert rows[-1]["error"] == "ValueError: expected an image batch of shape (B, 3, H, W)"
    assert len(freed) >= 8, "memory was not freed after the failing cases"
    assert benchmark.is_oom(RuntimeError("CUDA error: out of memory")) and not benchmark.is_oom(ValueError("x"))


class _Logged(_Tiny):
    """_Tiny that appends its name to a shared log at each forward."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append(self.name)
        return super().forward(x)


def test_rounds_alternate_the_models_of_a_case(monkeypatch):
    log = []
    monkeypatch.setattr(benchmark, "build_model", lambda name, size, extra: _Logged(name, log))
    opts = benchmark.Options(mode="both", amp=False, warmup=1, iters=5, rounds=2, device="cpu", compare="tiny_ref")
    rows = benchmark.run(["tiny_a", "tiny_ref"], benchmark.plan_cases([], ["32:4", "32:2"]), opts,
                         emit=lambda row: None)
    got = [(r["model"], r["batch_size"], r["mode"], r["status"]) for r in rows]
    assert got == [("tiny_ref", 4, "infer", "oom"), ("tiny_a", 4, "infer", "oom"),
                   ("tiny_ref", 4, "train", "oom"), ("tiny_a", 4, "train", "oom"),
                   ("tiny_ref", 2, "infer", "ok"), ("tiny_a", 2, "infer", "ok"),
                   ("tiny_ref", 2, "train", "ok"), ("tiny_a", 2, "train", "ok")]
    for r in rows[4:]:
        assert r["reps"] == 5 and len(r["round_medians_ms"]) == 2 and r["options"]["rounds"] == 2
        assert min(r["round_medians_ms"]) >= r["ms_min"] and max(r["round_medians_ms"]) <= r["ms_max"]
    assert rows[5]["speedup_vs_ref"] == pytest.approx(rows[5]["img_per_s"] / rows[4]["img_per_s"])
    # The last two cases (batch 2, inference then training): one warm-up call per model, then rounds of 3
    # and 2 timed calls that alternate between the models.
    per_case = ["tiny_ref", "tiny_a"] + ["tiny_ref"] * 3 + ["tiny_a"] * 3 + ["tiny_ref"] * 2 + ["tiny_a"] * 2
    assert log[-2 * len(per_case):] == per_case * 2
    assert benchmark._split(5, 2) == [3, 2] and benchmark._split(1, 3) == [1, 0, 0]


def test_case_planning_and_model_arguments():
    assert benchmark.plan_cases(["224", "96x128"], ["4", "1"]) == [((224, 224), 4), ((224, 224), 1),
                                                                   ((96, 128), 4), ((96, 128), 1)]
    assert benchmark.plan_cases([], ["224:64", "1024:4", "2048:1"]) == [((224, 224), 64), ((1024, 1024), 4),
                                                                        ((2048, 2048), 1)]
    assert benchmark.plan_cases(["1024"], ["224:64", "1024:4"]) == [((1024, 1024), 4)]
    for sizes, batches, message in ((["224"], ["224:4", "8"], "not a mix"), (["512"], ["224:4"], "no RES:BATCH pair"),
                                    (["22a"], ["1"], "N or HxW"), (["224"], ["0"], "positive integer")):
        with pytest.raises(ValueError, match=message):
            benchmark.plan_cases(sizes, batches)
    assert benchmark.parse_model_kwargs(["drop_path_rate=0.1", f"{REF}:dynamic_img_size=True", "act=gelu"]) == {
        "*": {"drop_path_rate": 0.1, "act": "gelu"}, REF: {"dynamic_img_size": True}}
    assert benchmark.model_kwargs(REF, (64, 64), {}) == {"img_size": (64, 64)}
    assert benchmark.model_kwargs(REF, (224, 224), {}) == {}
    assert benchmark.model_kwargs(REF, (64, 64), {REF: {"dynamic_img_size": True}}) == {"dynamic_img_size": True}
    assert benchmark.model_kwargs("linvit_t", (64, 64), {"*": {"drop_path_rate": 0.1}}) == {"drop_path_rate": 0.1}
    assert benchmark.resolve_models(["linvit_t", "linvit_t*"])[:2] == ["linvit_t", "linvit_t_focused"]


def test_command_line_prints_one_json_line_per_case(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("_linvision_tool_benchmark", ROOT / "tools" / "benchmark.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "r.jsonl"
    code = tool.main([REF, "--img-size", "32", "--batch-size", "1", "2", "--mode", "infer", "--warmup", "1",
                      "--iters", "1", "--device", "cpu", "--no-amp", "--channels-last", "--out", str(out),
                      "--plot", str(tmp_path / "p.png")])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert code == 0 and len(lines) == 2, captured
    rows = [json.loads(line) for line in lines]
    assert [(r["batch_size"], r["mode"], r["status"]) for r in rows] == [(1, "infer", "ok"), (2, "infer", "ok")]
    assert rows[0]["options"]["channels_last"] is True
    assert out.read_text().splitlines() == lines and (tmp_path / "p.png").exists()
    assert "| vit_tiny_patch16_224 | 32x32 | 2 | infer | ok |" in captured.err
    with pytest.raises(SystemExit) as exit_info:
        tool.main([REF, "--batch-size", "224:4", "8", "--device", "cpu"])
    assert exit_info.value.code == 2 and "not a mix" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        tool.main([REF, "--rounds", "0", "--device", "cpu"])
    assert exit_info.value.code == 2 and "--rounds must be >= 1, got 0" in capsys.readouterr().err


def test_profile_model_on_the_cpu(capsys):
    """The profiler tool runs the benchmark's steps; on the CPU its "kernels" are the top-level operators."""
    from linvision.profiling import profile_model
    model = benchmark.build_model(REF, (32, 32), {})
    for mode in ("infer", "train"):
        result = profile_model(model, 2, (32, 32), mode, iters=1, warmup=1, amp_dtype=None)
        assert result["ms_per_step"] > 0 and result["device_ms_per_step"] > 0
        assert sum(f["share"] for f in result["families"]) == pytest.approx(1.0, abs=1e-3)
        assert any(k["name"] == "aten::linear" and k["calls"] >= 1 for k in result["kernels"]), result["kernels"]
        assert all(p.grad is None for p in model.parameters())      # the training step's state let go
    with pytest.raises(ValueError, match="mode must be one of"):
        profile_model(model, 1, (32, 32), "both")
    spec = importlib.util.spec_from_file_location("_linvision_tool_profile", ROOT / "tools" / "profile_model.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([REF, "--img-size", "32", "--batch-size", "1", "--mode", "infer", "--iters", "1",
                      "--warmup", "0", "--device", "cpu", "--amp-dtype", "none",
                      "--model-kwargs", f"{REF}:drop_rate=0.0"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["model"] == REF and line["mode"] == "infer" and line["device"] == "cpu" and line["kernels"]


@pytest.mark.parametrize("name,family", [
    ("dgrad2d_c1_k1_nhwc_specialized", "depthwise_conv"),
    ("wgrad2d_c1_k1_nhwc", "depthwise_conv"),
    ("conv2d_c1_k1_nhwc_specialized", "depthwise_conv"),
    ("_bwd_q_kernel", "linear_attention"),
    ("nvjet_sm90_tst_64x512_64x2_1x2_h_bz_coopB_NNT", "matmul_or_conv"),
    ("void at::native::vectorized_layer_norm_kernel<c10::BFloat16, float, false>", "norm"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::GeluCUDAKernelImpl", "activation"),
    ("something_unknown", "other"),
])
def test_profile_kernel_families(name, family):
    from linvision.profiling import kernel_family
    assert kernel_family(name) == family
