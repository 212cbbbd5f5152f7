"""Pretrained weights: the registry, verified downloads, conversion, export and safe reading.

Everything runs offline: downloads come from an HTTP server on 127.0.0.1 started by the test, and
"official" checkpoints are written by the tests in the official layout with random weights.
"""
import argparse
import http.server
import importlib.util
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import linvision  # noqa: F401  (registers the models)
from linvision import pretrained
from linvision.checkpoint import save_weights, write_manifest
from linvision.training import cli
from linvision.serialization import CheckpointError, load_checkpoint_file
from official_reference import official_forward
from test_official_checkpoints import official_state_dict

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_linvision_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- local server
class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict = {}
    cut_once: set = set()
    range_requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", "/files/" + self.path[len("/redirect/"):])
            self.end_headers()
            return
        name = self.path.rsplit("/", 1)[-1]
        data = self.files.get(name)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng:
            self.range_requests.append(rng)
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if name in self.cut_once and not rng:
            self.cut_once.discard(name)  # send half, then drop the connection
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LINVISION_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _ema_of(sd: dict) -> dict:
    return {k: v * 1.01 if v.is_floating_point() and not k.endswith("angle") else v for k, v in sd.items()}


def _official_container(path: Path, name: str = "ravlt_t") -> dict:
    """An official-format training checkpoint: weights, EMA and a pickled argparse Namespace."""
    sd = official_state_dict(name)
    torch.save({"model": sd, "model_ema": _ema_of(sd), "epoch": 299,
                "args": argparse.Namespace(model=name.upper(), lr=1e-3)}, path)
    return sd


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _registry_with(monkeypatch, **entry) -> pretrained.WeightEntry:
    e = pretrained.WeightEntry(**entry)
    monkeypatch.setattr(pretrained, "_REGISTRY", {e.name: e})
    return e


# ------------------------------------------------------------------------------------ downloads
def test_download_resumes_after_a_cut_follows_redirects_and_converts(server, cache, tmp_path, monkeypatch, capsys):
    raw = tmp_path / "RAVLT_T.pth"
    sd = _official_container(raw)
    data = raw.read_bytes()
    _Handler.files["RAVLT_T.pth"] = data
    _Handler.cut_once.add("RAVLT_T.pth")
    _Handler.range_requests.clear()
    entry = _registry_with(monkeypatch, name="ravlt_t.in1k", model="ravlt_t", url=f"{server}/redirect/RAVLT_T.pth",
                           filename="RAVLT_T.pth", size=len(data))
    weights = pretrained.fetch(entry.name, progress=True, explicit=True)
    assert _Handler.range_requests and _Handler.range_requests[0].startswith("bytes=")   # resumed, not restarted
    assert weights == cache / "ravlt_t.in1k" / "model.safetensors"
    manifest = json.loads((cache / "ravlt_t.in1k" / "model.json").read_text())
    assert manifest["download"]["sha256"] == pretrained.sha256_file(cache / "ravlt_t.in1k" / "RAVLT_T.pth")
    assert not list((cache / "ravlt_t.in1k").glob("*.part"))
    assert "RAVLT_T.pth" in capsys.readouterr().err                      # the progress bar names the file
    # The cached weights are the official ones (EMA preferred by the MALA/RALA filter), in our layout.
    model = timm.create_model("ravlt_t", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = official_forward(_ema_of(sd), x, depths=(2, 2, 6, 2), heads=(1, 2, 4, 8), linear="rala")
        assert _rel_err(model(x), ref) < 1e-4
    assert model.pretrained_cfg.get("state_dict") is None                # the checkpoint is not kept alive
    # The folder is also a timm local-dir model.
    again = timm.create_model(f"local-dir:{cache / 'ravlt_t.in1k'}", pretrained=True).eval()
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_sha256_mismatch_leaves_nothing_under_the_final_name(server, cache, monkeypatch):
    _Handler.files["bad.pth"] = b"\x80" + os.urandom(4096)
    entry = _registry_with(monkeypatch, name="ravlt_t.in1k", model="ravlt_t", url=f"{server}/files/bad.pth",
                           filename="bad.pth", sha256="0" * 64)
    with pytest.raises(pretrained.PretrainedError, match="sha256"):
        pretrained.fetch(entry.name, progress=False, explicit=True)
    folder = cache / "ravlt_t.in1k"
    assert not (folder / "bad.pth").exists() and not (folder / "bad.pth.part").exists()
    assert pretrained.cached_weights(entry.name) is None


def test_http_error_is_one_line(server, cache, monkeypatch):
    entry = _registry_with(monkeypatch, name="ravlt_t.in1k", model="ravlt_t", url=f"{server}/files/missing.pth")
    with pytest.raises(pretrained.PretrainedError, match=r"HTTP 404") as err:
        pretrained.fetch(entry.name, progress=False, explicit=True)
    assert "\n" not in str(err.value)


def test_offline_pretrained_without_cache_fails_fast_naming_the_tool(cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(pretrained.PretrainedError) as err:
        timm.create_model("ravlt_s", pretrained=True)
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert "\n" not in msg and "tools/download.py ravlt_s.in1k" in msg


def test_manual_sources_print_the_page_and_the_convert_line(cache):
    with pytest.raises(pretrained.PretrainedError) as err:
        pretrained.fetch("mavit_s.in1k", progress=False, explicit=True)
    assert "huggingface.co/aldjalkdf/MAViT" in str(err.value)
    assert "tools/convert.py FILE --name mavit_s.in1k" in str(err.value)


def test_download_list_shows_every_release(cache, capsys):
    assert _tool("download").main(["--list"]) == 0
    out = capsys.readouterr().out
    for entry in pretrained.list_weights():
        line = next(l for l in out.splitlines() if l.startswith(entry.name + " "))
        assert entry.source in line


# ---------------------------------------------------------------------------------- the registry
def test_registry_entries_name_registered_models_and_agree_with_their_cfgs():
    entries = pretrained.list_weights()
    assert len({e.name for e in entries}) == len(entries)
    for e in entries:
        assert e.model in timm.list_models(), f"{e.name}: model {e.model} is not registered"
        assert e.source.startswith("https://"), e.name
        assert e.params_m and e.macs_g, e.name
        if e.task == "classification":
            cfg = timm.models.get_pretrained_cfg(e.name)
            assert cfg is not None, f"{e.name}: no timm pretrained cfg with this tag"
            if e.hf_hub_id:
                assert cfg.hf_hub_id == e.hf_hub_id and cfg.hf_hub_filename == e.hf_filename, e.name
            else:
                assert cfg.url == e.source, e.name
        else:
            assert e.config and (ROOT / e.config).is_file(), e.name
    # ... and every linvision pretrained tag with a download source has an entry.
    names = {e.name for e in entries}
    for tag in timm.list_pretrained():
        module = timm.models.get_arch_name(tag)
        cfg = timm.models.get_pretrained_cfg(tag)
        if timm.models._registry._model_to_module.get(module, "").startswith("linvision") and (cfg.url or cfg.hf_hub_id):
            assert tag in names, f"{tag} has a download source but no registry entry"


# ---------------------------------------------------------------------------------- conversion
def test_convert_tool_writes_a_strictly_loadable_folder(tmp_path, capsys):
    raw = tmp_path / "RAVLT_T.pth"
    sd = _official_container(raw)
    out = tmp_path / "converted"
    assert _tool("convert").main([str(raw), "--model", "ravlt_t", "--output", str(out), "--no-use-ema"]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = official_forward(sd, x, depths=(2, 2, 6, 2), heads=(1, 2, 4, 8), linear="rala")
        assert _rel_err(model(x), ref) < 1e-4


def test_export_writes_a_hub_folder_timm_loads(tmp_path):
    model = timm.create_model("linvit_t", num_classes=3).eval()
    weights = save_weights(model.state_dict(), tmp_path / "best.safetensors",
                           dict(model="linvit_t", num_classes=3, in_chans=3, classes=["a", "b", "c"],
                                input_size=[3, 64, 64], crop_pct=1.0, interpolation="bilinear",
                                mean=[0.5] * 3, std=[0.5] * 3))
    out = tmp_path / "hub" / "linvit_t-abc"
    assert _tool("export").main([str(weights), "--output", str(out)]) == 0
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "README.md", "model.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "linvit_t" and config["num_classes"] == 3
    assert config["label_names"] == ["a", "b", "c"] and config["pretrained_cfg"]["input_size"] == [3, 64, 64]
    again = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), again(x))


# ---------------------------------------------------------------------- safe reading everywhere
class _Evil:
    """A pickle whose loading would create a file (the side effect the tests look for)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    sd = official_state_dict("ravlt_t")
    torch.save({"model": sd, "payload": _Evil(marker)}, path)
    return path, marker


def _one_line_refusal(text: str, path: Path) -> None:
    line = next(l for l in text.splitlines() if str(path) in l and "refused" in l)
    assert "posix.system" in line or "os.system" in line
    assert "weights_only=False" not in text and "trust" not in text.lower()


def test_malicious_pickle_is_refused_through_every_entry_point(evil, tmp_path, capsys, monkeypatch):
    path, marker = evil
    # 1. the reader itself and timm's pretrained overlay
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    _one_line_refusal(str(err.value), path)
    with pytest.raises(CheckpointError):
        timm.create_model("ravlt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    # 2. tools/eval.py
    image_dir = tmp_path / "data" / "val" / "a"
    image_dir.mkdir(parents=True)
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image_dir / "0.png")
    with pytest.raises(SystemExit) as exit_:
        cli.eval_main(["--checkpoint", str(path), "--model", "ravlt_t", "--data-dir", str(tmp_path / "data"),
                            "--no-progress", "--workers", "0"])
    _one_line_refusal(str(exit_.value.code), path)
    # 3. tools/convert.py
    assert _tool("convert").main([str(path), "--model", "ravlt_t", "--output", str(tmp_path / "c")]) == 1
    _one_line_refusal(capsys.readouterr().err, path)
    # 4. the torchvision detection builders and the dense backbone
    from linvision.adapters import fasterrcnn
    with pytest.raises(CheckpointError):
        fasterrcnn("ravlt_t", num_classes=3, checkpoint=str(path), min_size=64, max_size=64)
    # 5. the mm backbone's init_cfg
    import linvision.adapters.mm  # noqa: F401
    from mmengine.registry import MODELS
    backbone = MODELS.build(dict(type="LinVisionBackbone", model_name="ravlt_t",
                                 init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    with pytest.raises(CheckpointError):
        backbone.init_weights()
    # 6. torch.load of mmengine's Runner after train_dense's allow-list: still refused
    from linvision.serialization import allow_plain_data_in_torch_load
    allow_plain_data_in_torch_load()
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_training_resume_refuses_a_malicious_state_file(evil, tmp_path):
    path, marker = evil
    from linvision.checkpoint import load_state
    with pytest.raises(CheckpointError):
        load_state(path)
    assert not marker.exists()


def test_official_containers_with_pickled_configs_load_as_plain_data(tmp_path):
    """A yacs CfgNode (FLatten/InLine), an argparse Namespace (MALA/RALA) and numpy meta (mm*)."""
    import sys
    import types
    import numpy as np
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init=None):
            super().__init__(init or {})
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    yacs_config.CfgNode = CfgNode
    monkey = {"yacs": yacs, "yacs.config": yacs_config}
    sys.modules.update(monkey)
    try:
        torch.save({"model": {"w": torch.ones(2)}, "config": CfgNode({"MODEL": CfgNode({"TYPE": "swin"})}),
                    "args": argparse.Namespace(lr=0.1), "meta": {"iter": np.int64(7), "a": np.arange(3)}},
                   tmp_path / "c.pth")
    finally:
        for k in monkey:
            sys.modules.pop(k)
    out = load_checkpoint_file(tmp_path / "c.pth")
    assert type(out["config"]) is dict and out["config"] == {"MODEL": {"TYPE": "swin"}}
    assert out["args"] == {"lr": 0.1} and int(out["meta"]["iter"]) == 7
    assert torch.equal(out["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_damaged_files_give_a_one_line_error(tmp_path, damage, fmt):
    sd = {"w": torch.randn(256), "b": torch.randn(16)}
    path = tmp_path / f"m.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save({"model": sd}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(bytes(data[: len(data) * 2 // 3]))
    else:  # flip bytes in the middle of the tensor data: only a recorded sha256 can tell
        manifest = write_manifest(tmp_path / "m.json", {"weights": path})
        for i in range(4):
            data[len(data) // 2 + i] ^= 0xFF
        path.write_bytes(bytes(data))
        assert manifest.is_file()
    with pytest.raises(CheckpointError) as err:
        load_checkpoint_file(path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert any(w in msg for w in ("truncated", "corrupted", "incomplete"))


def test_eval_refuses_a_corrupted_best_checkpoint(tmp_path):
    """A flipped byte in best.safetensors is caught by the manifest beside it before evaluation."""
    model = timm.create_model("linvit_t", num_classes=2)
    weights = save_weights(model.state_dict(), tmp_path / "best.safetensors", dict(model="linvit_t", num_classes=2))
    write_manifest(tmp_path / "best.json", {"weights": weights})
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    (tmp_path / "data" / "val" / "a").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        cli.eval_main(["--checkpoint", str(weights), "--data-dir", str(tmp_path / "data")])
    assert "sha256" in str(exit_.value.code) and "corrupted" in str(exit_.value.code)
