"""The training path, observed through what it does rather than through its flags: blocks recomputed by
gradient checkpointing, the weights kept as best, which weights a checkpoint container yields, mixed
precision steps on CPU and the fp16 loss scaler across a resume, damaged or foreign checkpoints, a kill in
the middle of a save, a corrupt image in the data. CPU, one thread, a narrow linvit_t (one block per stage) at 32×32 on a tiny ImageFolder."""
import importlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import linvision  # noqa: F401  (registers the models)
from linvision import checkpoint as ckpt
from linvision.training import cli, trainer
from linvision.serialization import EMA_KEYS, RAW_KEYS, unwrap_checkpoint
from linvision.training import checkpoint_sets as ckpt_sets
from linvision.training.checkpoint_sets import CheckpointManager, resolve_resume
from linvision.training.common import InputError

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("dots", "bars", "blank")
COMMON = ["--model", "linvit_t", "--img-size", "32", "--batch-size", "8", "--workers", "0", "--warmup-epochs", "0",
          "--lr", "1e-3", "--seed", "0", "--no-progress",
          # one block per stage, narrow: a CPU fp16 step of the full linvit_t takes seconds
          "--model-kwargs", "depths=(1,1,1,1)", "embed_dims=(16,32,64,128)", "num_heads=(1,1,2,4)", "projection=128"]
TINY_BLOCKS = 4


def _train(argv):
    """tools/train.py's ``main(argv)``."""
    return cli.train_main(argv)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """DATA/{train,val}/<class>/*.png: 3 classes, 8 train and 4 val 16×16 images each (3 batches of 8)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for ci, c in enumerate(CLASSES):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, size=(16, 16, 3))
                img[::4 if ci == 0 else 1, ::4 if ci == 0 else 3] += 150 * (ci < 2)
                Image.fromarray(img.astype(np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _same_tensors(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------

FAMILIES = [("linvit_t", {}), ("mavit_t", {}), ("flatten_cswin_t", {}), ("inline_deit_t", dict(img_size=64)),
            ("infvit_linear_4l", dict(img_size=64)), ("qtvit_1", {})]


def _blocks_entered_during_backward(model, x):
    """Names of the ``blocks.<i>`` modules whose forward is entered while ``backward`` runs. (A pre-hook:
    non-reentrant checkpointing stops a recomputation once it has what it needs, before forward hooks.)"""
    blocks = {m: n for n, m in model.named_modules() if re.search(r"(^|\.)blocks\.\d+$", n)}
    assert blocks, "no blocks.<i> modules found"
    out = model(x)
    seen = set()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: seen.add(blocks[m]) if m in blocks else None)
    try:
        out.float().sum().backward()
    finally:
        handle.remove()
    return set(blocks.values()), seen


@pytest.mark.parametrize("name,kwargs", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_grad_checkpointing_recomputes_every_block_in_backward(name, kwargs):
    model = timm.create_model(name, num_classes=3, **kwargs)
    x = torch.randn(1, 3, 64, 64)
    _, recomputed = _blocks_entered_during_backward(model, x)
    assert recomputed == set(), "blocks ran during backward without checkpointing"
    model.set_grad_checkpointing(True)
    blocks, recomputed = _blocks_entered_during_backward(model, x)
    assert recomputed == blocks, f"not recomputed: {sorted(blocks - recomputed)[:5]}"


# ---------------------------------------------------------------------------------------------
# EMA or raw weights out of a checkpoint container
# ---------------------------------------------------------------------------------------------

def _marked(value: float):
    return {"w": torch.full((2,), value)}


@pytest.mark.parametrize("key", RAW_KEYS + EMA_KEYS)
def test_unwrap_finds_the_weights_under_every_container_key_either_way(key):
    container = {key: _marked(1.0), "optimizer": {"state": {}}, "epoch": 3}
    for prefer_ema in (False, True):
        assert torch.equal(unwrap_checkpoint(container, prefer_ema=prefer_ema)["w"], torch.full((2,), 1.0))
    plain = _marked(2.0)
    assert unwrap_checkpoint(plain, prefer_ema=True) == plain  # a plain state dict is returned as is


@pytest.mark.parametrize("raw_key", RAW_KEYS)
@pytest.mark.parametrize("ema_key", EMA_KEYS)
def test_unwrap_priority_raw_by_default_ema_when_preferred(raw_key, ema_key):
    container = {ema_key: _marked(2.0), raw_key: _marked(1.0)}
    assert unwrap_checkpoint(container)["w"][0] == 1.0
    assert unwrap_checkpoint(container, prefer_ema=False)["w"][0] == 1.0
    assert unwrap_checkpoint(container, prefer_ema=True)["w"][0] == 2.0
    # The documented order within each kind: 'model' before 'state_dict'; state_dict_ema, model_ema, ema.
    assert unwrap_checkpoint({"state_dict": _marked(3.0), "model": _marked(1.0)})["w"][0] == 1.0
    every_ema = {k: _marked(10.0 + i) for i, k in enumerate(EMA_KEYS)}
    assert unwrap_checkpoint(every_ema, prefer_ema=True)["w"][0] == 10.0


def _container_of(model):
    """{'model': raw, 'state_dict_ema': raw + 1} built from the model's own (native) state dict."""
    raw = {k: v.clone() for k, v in model.state_dict().items()}
    ema = {k: (v + 1 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    return {"model": raw, "state_dict_ema": ema, "epoch": 300}, raw, ema


def test_linvit_filter_prefers_ema_weights():
    from linvision.backbones.linvit import checkpoint_filter_fn
    model = timm.create_model("linvit_t", num_classes=3)
    container, raw, ema = _container_of(model)
    assert _same_tensors(checkpoint_filter_fn(container, model), ema)
    assert _same_tensors(checkpoint_filter_fn({"model": raw}, model), raw)  # the fallback


@pytest.mark.parametrize("name,module,kwargs", [
    ("flatten_cswin_t", "cswin", {}), ("inline_deit_t", "inline_deit", dict(img_size=64)),
    ("qtvit_1", "qtvit", {})])
def test_flatten_inline_qtvit_filters_prefer_raw_weights(name, module, kwargs):
    filter_fn = importlib.import_module(f"linvision.backbones.{module}").checkpoint_filter_fn
    model = timm.create_model(name, num_classes=3, **kwargs)
    container, raw, ema = _container_of(model)
    out = filter_fn(container, model)
    for k, v in out.items():
        assert torch.equal(v, raw[k]), k
    assert len(out) >= len([k for k in raw if not k.endswith("num_batches_tracked")]) - 2


# ---------------------------------------------------------------------------------------------
# Runs: best checkpoint, bf16 autocast on CPU, resuming into another model
# ---------------------------------------------------------------------------------------------

SCRIPTED_TOP1 = {"model": [40.0, 90.0, 55.0], "ema": [45.0, 60.0, 80.0]}   # best: the model after epoch 2


@pytest.fixture(scope="module")
def scripted_run(image_folder, tmp_path_factory):
    """3 epochs (3 updates each) with EMA under bf16 autocast on CPU; val top-1 scripted per epoch. Records the
    dtype the classifier computed in."""
    out = tmp_path_factory.mktemp("scripted")
    mp = pytest.MonkeyPatch()
    real_evaluate, calls = trainer.evaluate, {"model": 0, "ema": 0}

    def scripted(model, loader, *args, **kwargs):
        metrics = real_evaluate(model, loader, *args, **kwargs)
        source = "ema" if "ema" in str(kwargs.get("desc", "")) else "model"
        metrics["top1"] = SCRIPTED_TOP1[source][calls[source]]
        calls[source] += 1
        return metrics
    mp.setattr(trainer, "evaluate", scripted)
    head_dtypes = set()
    real_build = trainer.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.head.register_forward_hook(lambda m, a, o: head_dtypes.add(o.dtype) if m.training else None)
        return model
    mp.setattr(trainer, "build_model", build)
    try:
        result = _train(COMMON + ["--data-dir", str(image_folder), "--epochs", "3", "--model-ema",
                                  "--model-ema-decay", "0.5", "--amp", "--keep-last", "3", "--output", str(out)])
    finally:
        mp.undo()
    return out, result, head_dtypes


def test_best_checkpoint_holds_the_best_scoring_weights(scripted_run):
    out, result, _ = scripted_run
    assert (result["best_top1"], result["best_epoch"], result["best_source"]) == (90.0, 2, "model")
    best = ckpt.load_weights(out / "best.safetensors")
    after_epoch_2 = ckpt.load_weights(out / "checkpoints" / "step-000000006.safetensors")
    assert _same_tensors(best, after_epoch_2)
    assert not _same_tensors(best, ckpt.load_weights(out / "last.safetensors"))
    assert ckpt.read_weights_metadata(out / "best.safetensors")["top1"] == 90.0


def test_bf16_autocast_training_steps_on_cpu(scripted_run):
    out, result, head_dtypes = scripted_run
    assert head_dtypes == {torch.bfloat16}
    assert result["num_updates"] == 9 and np.isfinite(result["history"][-1]["train_loss"])
    first = ckpt.load_weights(out / "checkpoints" / "step-000000003.safetensors")
    last = ckpt.load_weights(out / "last.safetensors")
    assert all(v.dtype == torch.float32 for v in last.values() if v.is_floating_point())   # fp32 master weights
    assert not _same_tensors(first, last)


def test_resuming_into_a_different_model_is_refused(scripted_run, image_folder):
    out, _, _ = scripted_run
    before = (out / "last.json").read_bytes(), (out / "last.safetensors").stat().st_mtime_ns
    argv = COMMON + ["--data-dir", str(image_folder), "--epochs", "4", "--output", str(out), "--resume", "auto"]
    argv[argv.index("linvit_t")] = "linvit_s"                  # same keys, other shapes
    with pytest.raises((SystemExit, InputError)) as e:
        _train(argv)
    message = str(getattr(e.value, "code", e.value))
    assert "linvit_t" in message and "linvit_s" in message, message
    assert ((out / "last.json").read_bytes(), (out / "last.safetensors").stat().st_mtime_ns) == before


# ---------------------------------------------------------------------------------------------
# fp16 autocast + loss scaler on CPU, and the scaler across a resume
# ---------------------------------------------------------------------------------------------

def _growing_scaler(monkeypatch):
    """The run's NativeScaler with a scale that doubles after every finite step (growth_interval 1), so the
    saved scaler state differs from a fresh one after the first update."""
    real = trainer.NativeScaler

    def make(*args, **kwargs):
        scaler = real(*args, **kwargs)
        scaler._scaler = torch.amp.GradScaler(kwargs.get("device", "cpu"), init_scale=2.0 ** 8, growth_interval=1)
        return scaler
    monkeypatch.setattr(trainer, "NativeScaler", make)


def _kill_at_update(monkeypatch, n: int) -> None:
    """KeyboardInterrupt right after the n-th optimizer step (before its checkpoint), like a SIGKILL."""
    real = trainer.create_optimizer_v2

    def create(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        steps = []

        def hook(opt, a, kw):
            steps.append(1)
            if len(steps) == n:
                raise KeyboardInterrupt
        optimizer.register_step_post_hook(hook)
        return optimizer
    monkeypatch.setattr(trainer, "create_optimizer_v2", create)


def test_fp16_scaler_steps_on_cpu_and_resume_restores_it(image_folder, tmp_path, monkeypatch):
    """--amp-dtype float16 on CPU: autocast runs in fp16 and the loss scaler steps (its scale grows); a run
    killed in epoch 2 and resumed ends with the uninterrupted run's scaler state and weights. Gradient
    checkpointing is on: every block is entered again during each backward."""
    argv = COMMON + ["--data-dir", str(image_folder), "--epochs", "2", "--amp", "--amp-dtype", "float16",
                     "--grad-checkpointing", "--save-every-steps", "1"]
    _growing_scaler(monkeypatch)
    entered = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: entered.append(torch.is_grad_enabled()) if type(m).__name__ == "LinViTBlock" else None)
    try:
        straight = _train(argv + ["--output", str(tmp_path / "straight")])
    finally:
        handle.remove()
    # Each block, in each of the 6 steps: entered once in forward and once more in backward (eval runs without).
    assert entered.count(True) == 2 * TINY_BLOCKS * 6, len(entered)
    final = ckpt.load_state(tmp_path / "straight" / "last_state.pth")["scaler"]
    assert final["scale"] > 2.0 ** 8, final    # it stepped and grew

    out = tmp_path / "resumed"
    _kill_at_update(monkeypatch, 4)              # saved after update 3 (epoch 1's end), dies in epoch 2
    with pytest.raises(KeyboardInterrupt):
        _train(argv + ["--output", str(out)])
    monkeypatch.undo()
    _growing_scaler(monkeypatch)
    saved = ckpt.load_state(out / "last_state.pth")
    assert saved["num_updates"] == 3 and saved["scaler"]["scale"] > 2.0 ** 8
    resumed = _train(argv + ["--output", str(out), "--resume", "auto"])
    assert resumed["epochs_run"] == 1 and resumed["num_updates"] == straight["num_updates"]
    assert ckpt.load_state(out / "last_state.pth")["scaler"] == final
    assert _same_tensors(ckpt.load_weights(out / "last.safetensors"),
                         ckpt.load_weights(tmp_path / "straight" / "last.safetensors"))


# ---------------------------------------------------------------------------------------------
# Checkpoint sets: all damaged, killed mid-save
# ---------------------------------------------------------------------------------------------

def _save_set(manager, step, value):
    weights = {"w": torch.full((64,), float(value))}
    state = {"format": "linvision.train_state/2", "epoch": step - 1, "next_epoch": step, "batches_done": 0,
             "num_updates": step, "args": {"model": "linvit_t"}}
    return manager.save(step, weights, state, {"model": "linvit_t", "epoch": step - 1})


def test_every_checkpoint_set_damaged_is_an_error_not_a_fresh_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2, log=lambda s: None)
    for step in (1, 2):
        _save_set(manager, step, step)
    for f in (tmp_path / "checkpoints").glob("*.state.pth"):
        f.write_bytes(f.read_bytes()[:100])             # both sets truncated (and last.* links to the newest)
    with pytest.raises(InputError, match="no intact checkpoint"):
        resolve_resume("auto", tmp_path, log=lambda s: None)
    # An empty output directory is a fresh start, not an error.
    assert resolve_resume("auto", tmp_path / "fresh", log=lambda s: None) is None


@pytest.mark.parametrize("same_step", [False, True], ids=["next-set", "same-set-rewritten"])
def test_kill_inside_a_save_leaves_the_previous_set_loadable(tmp_path, monkeypatch, same_step):
    """Killed while the state file of the next set (or of the same update's set being replaced, as the
    epoch-end save replaces a mid-epoch one) is half written: the newest intact older set is found and loads."""
    manager = CheckpointManager(tmp_path, keep_last=3, log=lambda s: None)
    _save_set(manager, 1, 1.0)
    _save_set(manager, 2, 2.0)
    real_save = torch.save

    def killed(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:200])   # the bytes on disk so far
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        _save_set(manager, 2 if same_step else 3, 3.0)
    monkeypatch.undo()
    found = resolve_resume("auto", tmp_path, log=lambda s: None)
    expected_step = 1 if same_step else 2
    assert found.path.name in (f"step-{expected_step:09d}.json", "last.json")
    loaded = found.load()
    assert loaded["state"]["num_updates"] == expected_step
    assert torch.equal(loaded["weights"]["w"], torch.full((64,), float(expected_step)))


# ---------------------------------------------------------------------------------------------
# Data: a corrupt image
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_training_image_is_skipped_with_a_warning(image_folder, tmp_path, caplog, damage):
    """As documented in linvision.training.data: an image that cannot be decoded is replaced by the next one
    in the folder, with a warning naming its index (timm's ImageDataset); nothing stops the epoch."""
    from linvision.training.data import create_datasets
    import shutil
    root = tmp_path / "data"
    shutil.copytree(image_folder, root)
    victim = root / "train" / CLASSES[0] / "3.png"
    raw = victim.read_bytes()
    victim.write_bytes(b"\x00not an image" * 20 if damage == "garbage" else raw[:len(raw) // 2])
    datasets, _ = create_datasets(str(root), ("train",), in_chans=3)
    ds = datasets["train"]
    index = [Path(p) for p, _ in ds.reader.samples].index(victim)
    with caplog.at_level(logging.WARNING):
        img, target = ds[index]
    next_img, next_target = ds[index + 1]
    assert target == next_target and np.array_equal(np.asarray(img), np.asarray(next_img))
    assert any("Skipped sample" in r.getMessage() and str(index) in r.getMessage() for r in caplog.records)
