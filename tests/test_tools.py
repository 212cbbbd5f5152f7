"""End-to-end tests of tools/train.py and tools/eval.py on a tiny generated ImageFolder, plus the
atomic checkpoint writers they rely on. CPU, one thread, linvit_t at 32x32."""
import errno
import importlib.util
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from linvision import checkpoint as ckpt
from linvision.training import cli, evaluation, trainer
from linvision.training.checkpoint_sets import BEST_WEIGHTS, LAST_STATE, LAST_WEIGHTS, CheckpointManager
from linvision.training.model import to_channels_last
from linvision.training.monitor import SUMMARY

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("circle", "square", "stripes")
COMMON = ["--model", "linvit_t", "--img-size", "32", "--batch-size", "8", "--workers", "0",
          "--warmup-epochs", "0", "--lr", "1e-3", "--seed", "0", "--no-progress"]


def _tool(name: str):
    """Import tools/<name>.py as a module (tools/ is not a package; train and eval come from
    :mod:`linvision.training.cli`); its ``main(argv)`` is the CLI."""
    spec = importlib.util.spec_from_file_location(f"_linvision_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _image(kind: str, rng: np.random.Generator) -> Image.Image:
    """A 16x16 RGB image whose shape depends on the class, with random colour and noise."""
    yy, xx = np.mgrid[:16, :16]
    if kind == "circle":
        mask = (yy - 8) ** 2 + (xx - 8) ** 2 < 30
    elif kind == "square":
        mask = (abs(yy - 8) < 5) & (abs(xx - 8) < 5)
    else:
        mask = (xx // 2) % 2 == 0
    colour = rng.integers(80, 256, size=3)
    img = mask[..., None] * colour + rng.integers(0, 40, size=(16, 16, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """DATA/{train,val}/<class>/*.png: 3 classes, 8 train and 4 val images each."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in CLASSES:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _image(c, rng).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """One epoch of training into a fresh output directory: (output dir, train's return value)."""
    out = tmp_path_factory.mktemp("run")
    yield out, cli.train_main(COMMON + ["--data-dir", str(image_folder), "--epochs", "1",
                                             "--output", str(out)])
    shutil.rmtree(out, ignore_errors=True)  # checkpoints are large: free the disk for the next modules


def test_train_writes_checkpoints(trained):
    out, result = trained
    for name in (LAST_WEIGHTS, BEST_WEIGHTS, LAST_STATE, SUMMARY):
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    assert result["epochs_run"] == 1 and result["best_epoch"] == 1
    assert 0.0 <= result["best_top1"] <= 100.0
    meta = ckpt.read_weights_metadata(out / BEST_WEIGHTS)
    assert meta["model"] == "linvit_t" and meta["classes"] == list(CLASSES) and meta["epoch"] == 0
    state = ckpt.load_state(out / LAST_STATE)
    assert state["epoch"] == 0 and state["num_updates"] == 3  # 24 images / batch 8
    assert {"optimizer", "scheduler", "rng", "args"} <= set(state)


def test_eval_prints_metrics(trained, image_folder, capsys):
    out, result = trained
    metrics = cli.eval_main(["--checkpoint", str(out / BEST_WEIGHTS), "--data-dir", str(image_folder),
                                  "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed and "img/s" in printed
    assert metrics["num_images"] == 12
    # Same weights and preprocessing (read back from the checkpoint's metadata) as train's val pass.
    assert metrics["top1"] == pytest.approx(result["last"]["top1"])
    assert metrics["top5"] == 100.0  # 3 classes: top-5 is top-3


def test_eval_pth_checkpoint_on_split_folder(trained, image_folder, tmp_path):
    out, result = trained
    # A foreign-style .pth (no metadata): the model flags must be given; the defaults here match
    # what training used (the model's default crop and normalisation).
    pth = tmp_path / "weights.pth"
    torch.save({"state_dict": ckpt.load_weights(out / BEST_WEIGHTS)}, pth)
    metrics = cli.eval_main(["--model", "linvit_t", "--num-classes", "3", "--img-size", "32",
                                  "--checkpoint", str(pth), "--data-dir", str(image_folder / "val"),
                                  "--workers", "0", "--no-progress"])
    assert metrics["num_images"] == 12
    assert metrics["top1"] == pytest.approx(result["last"]["top1"])


def test_eval_rejects_state_file(trained, image_folder):
    out, _ = trained
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["--checkpoint", str(out / LAST_STATE), "--data-dir", str(image_folder)])
    assert "training-state file" in str(e.value.code)


def test_resume_continues_from_saved_epoch(image_folder, tmp_path, capsys, monkeypatch):
    train_main = cli.train_main
    args = COMMON + ["--data-dir", str(image_folder), "--epochs", "2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_main(args + ["--output", str(straight)])

    # The same run killed during its second epoch ...
    real_epoch, calls = trainer.train_one_epoch, []

    def killed_in_second_epoch(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*a, **kw)

    monkeypatch.setattr(trainer, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_main(args + ["--output", str(resumed)])
    monkeypatch.undo()
    assert ckpt.load_state(resumed / LAST_STATE)["epoch"] == 0

    # ... and restarted with --resume auto runs only the second epoch.
    capsys.readouterr()
    result = train_main(args + ["--output", str(resumed), "--resume", "auto"])
    printed = capsys.readouterr().out
    epoch_lines = [line.split()[1] for line in printed.splitlines() if line.startswith("epoch ")]
    assert "resumed from" in printed and epoch_lines == ["2/2"]
    assert result["epochs_run"] == 1
    assert ckpt.load_state(resumed / LAST_STATE)["epoch"] == 1
    assert len((resumed / SUMMARY).read_text().strip().splitlines()) == 3  # header + 2 epochs
    # Weights, optimizer, schedule position and RNG states are all restored, so the resumed run
    # ends exactly where the uninterrupted one does.
    a, b = ckpt.load_weights(straight / LAST_WEIGHTS), ckpt.load_weights(resumed / LAST_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_resume_auto_without_state_starts_fresh(image_folder, tmp_path, capsys):
    result = cli.train_main(COMMON + ["--data-dir", str(image_folder), "--epochs", "1",
                                           "--output", str(tmp_path), "--resume", "auto"])
    assert result["epochs_run"] == 1 and "resumed" not in capsys.readouterr().out


@pytest.mark.parametrize("layout, message", [
    ("missing", "data directory not found"),
    ("no_val", "has no 'val' folder"),
    ("flat", "holds images directly"),
])
def test_bad_data_layout_gives_clear_error(layout, message, image_folder, tmp_path):
    data = tmp_path / "data"
    if layout == "no_val":
        (data / "train" / "a").mkdir(parents=True)
        _image("circle", np.random.default_rng(0)).save(data / "train" / "a" / "0.png")
    elif layout == "flat":
        for split in ("train", "val"):
            (data / split).mkdir(parents=True)
            _image("circle", np.random.default_rng(0)).save(data / split / "0.png")
    with pytest.raises(SystemExit) as e:
        cli.train_main(COMMON + ["--data-dir", str(data), "--output", str(tmp_path / "out")])
    assert message in str(e.value.code)


def test_config_rejects_unknown_keys(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("epochs: 1\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args(["-c", str(config), "--data-dir", str(tmp_path)])
    assert e.value.code == 2 and "learning_rate" in capsys.readouterr().err


def test_config_sets_defaults_and_flags_override(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 3\nlr: 0.01\ndata_dir: /somewhere\nscale: [0.5, 1.0]\n")
    args = cli.parse_train_args(["-c", str(config), "--lr", "0.02"])
    assert (args.epochs, args.lr, args.data_dir, args.scale) == (3, 0.02, "/somewhere", [0.5, 1.0])


def _failing_serializer(tmp_arg_index: int):
    """A stand-in serializer that writes half a file, then dies like a full disk or a kill would."""
    def fail(*args, **kwargs):
        with open(args[tmp_arg_index], "wb") as f:
            f.write(b"partial")
        raise OSError("simulated crash mid-write")
    return fail


def test_atomic_weights_save_keeps_previous_file(tmp_path, monkeypatch):
    good = {"w": torch.arange(6.0).reshape(2, 3)}
    target = tmp_path / "last.safetensors"
    ckpt.save_weights(good, target, {"epoch": 0})
    before = target.read_bytes()

    monkeypatch.setattr(ckpt, "save_file", _failing_serializer(1))
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_weights({"w": torch.zeros(2, 3)}, target, {"epoch": 1})
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_weights(good, tmp_path / "new.safetensors")

    assert target.read_bytes() == before
    torch.testing.assert_close(ckpt.load_weights(target)["w"], good["w"])
    assert ckpt.read_weights_metadata(target) == {"epoch": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.safetensors"]  # no new file, no temp


def test_atomic_state_save_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last_state.pth"
    ckpt.save_state({"epoch": 3, "rng": ckpt.capture_rng_state()}, target)
    monkeypatch.setattr(torch, "save", _failing_serializer(1))
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_state({"epoch": 4}, target)
    monkeypatch.undo()
    assert ckpt.load_state(target)["epoch"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last_state.pth"]


def test_full_disk_error_names_the_file_and_keeps_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.safetensors"
    ckpt.save_weights({"w": torch.ones(3)}, target)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with pytest.raises(OSError, match=r"no space left on device while writing .*last\.safetensors \(\d+ MiB free"):
        ckpt.save_weights({"w": torch.zeros(3)}, target)
    torch.testing.assert_close(ckpt.load_weights(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # partial file removed


@pytest.mark.parametrize("extra, message", [
    (["--sync-bn"], "--sync-bn needs CUDA devices"),
    (["--fsdp", "--clip-grad", "0.01", "--clip-mode", "agc"], "--clip-mode agc does not run under --fsdp"),
])
def test_distributed_option_combinations_pytorch_cannot_run_are_refused(extra, message):
    from linvision.training.distributed import DistEnv
    args = cli.parse_train_args(["--data-dir", "unused"] + extra)
    two_cpu_ranks = DistEnv(torch.device("cpu"), 0, 0, 2, True)
    with pytest.raises(trainer.InputError, match=message):
        trainer.check_distributed_options(args, two_cpu_ranks)
    trainer.check_distributed_options(args, DistEnv(torch.device("cpu"), 0, 0, 1, False))  # one process: fine
    if "--sync-bn" in extra:
        trainer.check_distributed_options(args, DistEnv(torch.device("cuda", 0), 0, 0, 2, True))


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5)
    ckpt.restore_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def test_written_files_follow_umask(tmp_path):
    path = ckpt.save_weights({"w": torch.ones(1)}, tmp_path / "w.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_tied_weights_are_saved(tmp_path):
    shared = torch.arange(4.0)
    path = ckpt.save_weights({"embed": shared, "head": shared, "half": shared[2:]}, tmp_path / "tied.safetensors")
    loaded = ckpt.load_weights(path)
    torch.testing.assert_close(loaded["head"], shared)
    torch.testing.assert_close(loaded["half"], shared[2:])


def test_channels_last_keeps_gradient_strides_equal_to_parameter_strides():
    """DDP's contract: every gradient has its parameter's strides (else DDP warns and copies it each
    step). Convolution weights go channels_last; the (1, C, 1, 1) layer scales must not."""
    import timm
    model = timm.create_model("linvit_t", num_classes=3).eval()
    reference = timm.create_model("linvit_t", num_classes=3).eval()
    reference.load_state_dict(model.state_dict())
    to_channels_last(model)
    x = torch.randn(2, 3, 32, 32)
    out = model(x.contiguous(memory_format=torch.channels_last))
    out.sum().backward()
    torch.testing.assert_close(out, reference(x), rtol=1e-4, atol=1e-5)
    params = dict(model.named_parameters())
    assert params["stem.0.weight"].is_contiguous(memory_format=torch.channels_last)
    assert params["stem.0.weight"].stride() != params["stem.0.weight"].contiguous().stride()
    mismatched = [name for name, p in params.items() if p.grad is not None and p.grad.stride() != p.stride()]
    assert not mismatched, mismatched


# ----------------------------------------------------------------------------------------------
# Mid-epoch checkpoints, exact resume, damaged checkpoints

RECIPE = ["--epochs", "2", "--model-ema", "--model-ema-decay", "0.9", "--mixup", "0.8", "--cutmix", "1.0",
          "--aa", "rand-m3-mstd0.5-inc1", "--reprob", "0.25", "--drop-path", "0.1", "--grad-accum-steps", "2",
          "--save-every-steps", "1", "--keep-last", "3", "--workers", "2"]


def _kill_at_update(monkeypatch, n: int) -> None:
    """Make the next run die (KeyboardInterrupt) right after its n-th optimizer step: after the
    weights changed, before that update's scheduler/EMA step and checkpoint, like a SIGKILL."""
    real = trainer.create_optimizer_v2

    def create(*args, **kwargs):
        optimizer = real(*args, **kwargs)
        steps = []

        def hook(opt, a, kw):
            if opt.param_groups[0]["lr"] == 0:
                return  # the zero-lr step torch.distributed.checkpoint takes to create optimizer state
            steps.append(1)
            if len(steps) == n:
                raise KeyboardInterrupt
        optimizer.register_step_post_hook(hook)
        return optimizer
    monkeypatch.setattr(trainer, "create_optimizer_v2", create)


def _assert_same_weights(a_dir: Path, b_dir: Path, name: str) -> None:
    a, b = ckpt.load_weights(a_dir / name), ckpt.load_weights(b_dir / name)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{name}: {k}")


@pytest.fixture(scope="module")
def uninterrupted(image_folder, tmp_path_factory):
    """The reference run: 2 epochs of 3 batches, 2 batches per update: updates of 2 + 1 batches, 4 in all."""
    out = tmp_path_factory.mktemp("straight")
    yield out, cli.train_main(COMMON + RECIPE + ["--data-dir", str(image_folder), "--output", str(out)])
    shutil.rmtree(out, ignore_errors=True)


def test_killed_mid_epoch_and_resumed_equals_uninterrupted(uninterrupted, image_folder, tmp_path, monkeypatch,
                                                           capsys):
    """Mixup/cutmix, RandAugment, random erasing, drop path, EMA, gradient accumulation and two
    loader workers: the resumed run still ends bit-identical (weights, EMA, loss log)."""
    straight, result = uninterrupted
    assert result["num_updates"] == 4  # 3 batches per epoch, accumulation 2: updates of 2 + 1 batches
    out = tmp_path / "killed"
    args = COMMON + RECIPE + ["--data-dir", str(image_folder), "--output", str(out)]
    _kill_at_update(monkeypatch, 3)  # dies during epoch 2's first update; newest checkpoint: epoch 1's end
    with pytest.raises(KeyboardInterrupt):
        cli.train_main(args)
    monkeypatch.undo()
    state = ckpt.load_state(out / LAST_STATE)
    assert (state["epoch"], state["next_epoch"], state["batches_done"], state["num_updates"]) == (0, 1, 0, 2)
    _kill_at_update(monkeypatch, 2)  # resumes at the epoch-2 start, saves update 3 mid-epoch, dies in update 4
    with pytest.raises(KeyboardInterrupt):
        cli.train_main(args + ["--resume", "auto"])
    monkeypatch.undo()
    state = ckpt.load_state(out / LAST_STATE)
    assert (state["next_epoch"], state["batches_done"], state["num_updates"]) == (1, 2, 3)  # mid-epoch

    capsys.readouterr()
    resumed = cli.train_main(args + ["--resume", "auto"])
    printed = capsys.readouterr().out
    assert "at epoch 2/2, batch 2/3" in printed
    assert resumed["epochs_run"] == 1 and resumed["num_updates"] == 4
    _assert_same_weights(straight, out, LAST_WEIGHTS)
    _assert_same_weights(straight, out, "last.ema.safetensors")
    # The epoch's loss is accumulated across the interruption too.
    assert _same_csv_except_timing(straight / SUMMARY, out / SUMMARY)
    assert resumed["history"][-1]["train_loss"] == pytest.approx(result["history"][-1]["train_loss"], rel=1e-12)
    assert [p.name for p in CheckpointManager(out).step_manifests()] == \
        ["step-000000004.json", "step-000000003.json", "step-000000002.json"]  # --keep-last 3


def _same_csv_except_timing(a: Path, b: Path) -> bool:
    import csv
    rows_a, rows_b = (list(csv.DictReader(open(p))) for p in (a, b))
    drop = ("train_img_per_sec", "train_time", "train_peak_mem_mb")
    return [{k: v for k, v in r.items() if k not in drop} for r in rows_a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rows_b]


def test_damaged_checkpoints_fall_back_to_an_intact_one(uninterrupted, image_folder, tmp_path, monkeypatch, capsys):
    straight, _ = uninterrupted
    out = tmp_path / "damaged"
    args = COMMON + RECIPE + ["--data-dir", str(image_folder), "--output", str(out)]
    _kill_at_update(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        cli.train_main(args)
    monkeypatch.undo()
    sets = CheckpointManager(out).step_manifests()
    assert [p.stem for p in sets] == ["step-000000003", "step-000000002", "step-000000001"]
    # The newest set: its state file truncated (a full disk); the next: one weight byte flipped.
    state_file = out / "checkpoints" / "step-000000003.state.pth"
    state_file.write_bytes(state_file.read_bytes()[:1000])
    weights_file = out / "checkpoints" / "step-000000002.safetensors"
    raw = bytearray(weights_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    weights_file.write_bytes(bytes(raw))

    capsys.readouterr()
    resumed = cli.train_main(args + ["--resume", "auto"])
    printed = capsys.readouterr().out
    assert "step-000000003.json is unusable" in printed and "truncated" in printed
    assert "step-000000002.json is unusable" in printed and "sha256" in printed
    assert "resumed from" in printed and "step-000000001.json at epoch 1/2, batch 2/3" in printed
    assert "removing checkpoint step-000000003.json" in printed  # the abandoned (damaged) history
    assert resumed["num_updates"] == 4
    _assert_same_weights(straight, out, LAST_WEIGHTS)  # resuming from further back is exact as well

    # An explicitly named damaged checkpoint is an error, not a silent fallback.
    bad = out / "checkpoints" / "step-000000004.safetensors"
    bad.write_bytes(bad.read_bytes()[:-10])
    with pytest.raises(SystemExit) as e:
        cli.train_main(args + ["--resume", str(bad)])
    assert "truncated" in str(e.value.code)


def test_eval_uses_ema_and_halves_batch_on_oom(uninterrupted, image_folder, monkeypatch, capsys):
    straight, result = uninterrupted
    real = evaluation.evaluate

    def small_memory(model, loader, *args, **kwargs):
        if loader.batch_size > 3:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real(model, loader, *args, **kwargs)
    monkeypatch.setattr(evaluation, "evaluate", small_memory)
    metrics = cli.eval_main(["--checkpoint", str(straight / LAST_WEIGHTS), "--use-ema", "--data-dir",
                                  str(image_folder), "--workers", "0", "--no-progress", "-b", "12"])
    printed = capsys.readouterr().out
    assert metrics["batch_size"] == 3 and printed.count("out of memory") == 2  # 12 -> 6 -> 3
    assert metrics["weights"].endswith("last.ema.safetensors")
    assert metrics["top1"] == result["last_ema"]["top1"]
    assert metrics["loss"] == pytest.approx(result["last_ema"]["loss"], rel=1e-5)
    assert "throughput:" in printed


def test_tar_splits_train_and_eval(image_folder, tmp_path):
    import tarfile
    data = tmp_path / "tars"
    data.mkdir()
    for split in ("train", "val"):
        with tarfile.open(data / f"{split}.tar", "w") as tar:
            for c in CLASSES:
                tar.add(image_folder / split / c, arcname=c)
    out = tmp_path / "run"
    result = cli.train_main(COMMON + ["--data-dir", str(data), "--epochs", "1", "--output", str(out)])
    assert result["last"]["num_images"] == 12 and result["num_updates"] == 3
    metrics = cli.eval_main(["--checkpoint", str(out / BEST_WEIGHTS), "--data-dir", str(data / "val.tar"),
                                  "--workers", "0", "--no-progress"])
    assert metrics["top1"] == result["last"]["top1"]


def test_outputs_config_log_summary_and_plot(uninterrupted, tmp_path):
    straight, result = uninterrupted
    for name in ("config.yaml", "log.txt", "run_summary.json", "summary.csv", "last.json", "best.json"):
        assert (straight / name).is_file(), name
    summary = json.loads((straight / "run_summary.json").read_text())
    assert summary["best_top1"] == result["best_top1"] and summary["img_per_sec"] > 0
    assert summary["peak_mem_mb"] > 0 and len(summary["history"]) == 2
    header = (straight / SUMMARY).read_text().splitlines()[0].split(",")
    assert {"train_loss", "eval_top1", "eval_ema_top1", "lr", "train_peak_mem_mb"} <= set(header)
    assert "mixup: 0.8" in (straight / "config.yaml").read_text()
    png = _tool("plot_log").main([str(straight), "-o", str(tmp_path / "curves.png")])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
