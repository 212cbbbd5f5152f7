"""Every training config parses through tools/train.py's parser, states its paper's recipe and builds its model."""
from pathlib import Path

import pytest
import torch
import yaml

from linvision.training import cli
from linvision.training.model import build_model
from linvision.training.trainer import resolve_lr

ROOT = Path(__file__).resolve().parents[1]
IMAGENET = sorted((ROOT / "configs" / "imagenet").glob("*.yaml"))
ALL_CONFIGS = IMAGENET + [ROOT / "configs" / "demo.yaml"]
# Drop-path rates hard-coded per variant in the official MAViT/RAVLT builders.
DROP_PATH = {"t": 0.1, "s": 0.15, "b": 0.4, "l": 0.55}


def test_every_family_and_size_has_a_config():
    names = {p.stem for p in IMAGENET}
    assert names == {f"{fam}_{size}" for fam in ("mavit", "ravlt", "linvit") for size in "tsbl"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_builds_its_model(path):
    args = cli.parse_train_args(["-c", str(path), "--data-dir", "/nonexistent"])
    raw = yaml.safe_load(path.read_text())
    for key, value in raw.items():  # every key reached the namespace unchanged
        got = getattr(args, key)
        assert got == (tuple(value) if isinstance(got, tuple) else value), key
    num_classes = args.num_classes or 10
    model = build_model(args.model_spec(), num_classes).eval()
    if args.drop_path:  # the rate reached the model (0 builds no DropPath at all)
        dprs = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
        assert dprs and max(dprs) == pytest.approx(args.drop_path)
    with torch.no_grad():
        out = model(torch.randn(1, args.in_chans, 32, 32))
    assert out.shape == (1, num_classes) and torch.isfinite(out).all()


@pytest.mark.parametrize("path", IMAGENET, ids=lambda p: p.stem)
def test_imagenet_configs_follow_the_mavit_recipe(path):
    """The official MAViT/RAVLT training recipe (LinViT uses it unchanged)."""
    args = cli.parse_train_args(["-c", str(path), "--data-dir", "/nonexistent"])
    size = path.stem.split("_")[1]
    assert args.drop_path == DROP_PATH[size]
    assert (args.epochs, args.batch_size, args.img_size, args.num_classes) == (300, 128, 224, 1000)
    assert (args.opt, args.weight_decay, args.opt_eps, args.opt_betas) == ("adamw", 0.05, 1e-8, [0.9, 0.999])
    assert args.lr is None and (args.lr_base, args.lr_base_size, args.lr_base_scale) == (5e-4, 512, "linear")
    assert resolve_lr(args, 8 * 128) == pytest.approx(1e-3)
    assert (args.sched, args.sched_on_updates, args.warmup_epochs, args.warmup_lr, args.min_lr) == \
        ("cosine", False, 5, 1e-6, 1e-5)
    assert args.clip_grad is None
    assert (args.aa, args.reprob, args.remode, args.recount) == ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (args.mixup, args.cutmix, args.mixup_prob, args.mixup_switch_prob, args.mixup_mode) == \
        (0.8, 1.0, 1.0, 0.5, "batch")
    assert (args.smoothing, args.aug_repeats) == (0.1, 3)
    assert (args.model_ema, args.model_ema_decay, args.model_ema_decay_base_size) == (True, 0.99996, 512)
    assert (args.interpolation, args.crop_pct, args.sync_bn) == ("bicubic", 0.875, True)


def test_set_and_flags_override_a_config(tmp_path, capsys):
    path = ROOT / "configs" / "imagenet" / "mavit_t.yaml"
    args = cli.parse_train_args(["-c", str(path), "--data-dir", "d", "--set", "epochs=10", "--set", "scale=[0.5, 1.0]",
                             "--set", "model_ema=false", "--set", "lr=2e-3", "--batch-size", "64",
                             "--set", "batch_size=32"])
    assert (args.epochs, args.scale, args.model_ema, args.lr, args.batch_size) == (10, [0.5, 1.0], False, 2e-3, 64)
    with pytest.raises(SystemExit) as e:
        cli.parse_train_args(["-c", str(path), "--data-dir", "d", "--set", "learning_rate=1"])
    assert e.value.code == 2 and "learning_rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_train_args(["--data-dir", "d", "--set", "no-equals-sign"])


def test_saved_config_reads_back(tmp_path):
    from linvision.training.cli import config_dict
    from linvision.training.config import save_config
    parser = cli.build_train_parser()
    args = cli.parse_train_args(["-c", str(ROOT / "configs" / "imagenet" / "ravlt_s.yaml"), "--data-dir", "/data",
                             "--set", "epochs=7", "--output", str(tmp_path / "run")])
    saved = save_config(config_dict(args, parser), tmp_path / "config.yaml", header=["test"])
    again = cli.parse_train_args(["-c", str(saved)])
    assert config_dict(again, parser) == config_dict(args, parser)
