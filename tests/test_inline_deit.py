"""InLine-DeiT (inline_deit_{t,s,b}): sizes, official checkpoints, preprocessing, timm API.

The official weights cannot be downloaded here, so the checkpoint tests build random weights in
the official key layout, load them through
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and compare
with an independent functional forward of the official model (tests/official_reference_deit.py).
"""
import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.data import create_transform, resolve_data_config

import linvision  # noqa: F401  (registers the models)
from linvision.backbones.inline_deit import checkpoint_filter_fn
from official_reference_deit import official_deit_forward, official_state_dict
from vit_api_checks import check_vit_api

NAMES = ["inline_deit_t", "inline_deit_s", "inline_deit_b"]
# name: (width, heads, image size, params in the official table, to 3 decimals in millions)
OFFICIAL = {
    "inline_deit_t": (192, 6, 224, 6.478),
    "inline_deit_s": (320, 10, 288, 16.735),
    "inline_deit_b": (384, 12, 448, 23.797),
}


def _expected_params(c: int, heads: int, img: int, depth: int = 12, classes: int = 1000) -> int:
    """The official InLine-DeiT parameter count, from its layer shapes."""
    d = c // heads
    tokens = 1 + (img // 16) ** 2
    block = (
        2 * c                        # norm1
        + 3 * c * c + 3 * c          # qkv
        + c * d + c                  # residual.0: Conv1d(C, C, 1, groups=heads)
        + 9 * c * d + 9 * c          # residual.2: Conv1d(C, 9C, 1, groups=heads)
        + c * c + c                  # proj
        + 2 * c                      # norm2
        + 4 * c * c + 4 * c          # fc1
        + 4 * c * c + c              # fc2
    )
    embed = 3 * 16 * 16 * c + c + c + tokens * c  # patch conv, cls token, pos_embed
    return embed + depth * block + 2 * c + c * classes + classes


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_are_the_official_ones(name):
    c, heads, img, official = OFFICIAL[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == _expected_params(c, heads, img)
    assert round(n / 1e6, 3) == official
    assert model.pretrained_cfg["input_size"] == (3, img, img)
    assert model.patch_embed.grid_size == (img // 16, img // 16)
    assert model.blocks[0].norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert model.blocks[0].attn.mixer.num_prefix_tokens == 1


def test_full_size_official_key_layout_matches():
    sd = official_state_dict(192, 12, 6, 14)
    assert len(sd) == 200  # the official key count
    with torch.device("meta"):
        model = timm.create_model("inline_deit_t")
    converted = checkpoint_filter_fn(sd, model)
    ours = model.state_dict()
    assert set(converted) == set(ours)
    assert all(converted[k].shape == ours[k].shape for k in ours)


def _official_checkpoint(tmp_path, name="ckpt", grid=4, depth=2, seed=0):
    sd = official_state_dict(192, depth, 6, grid, seed=seed)
    path = tmp_path / f"{name}.safetensors"
    safetensors.torch.save_file(sd, str(path))
    return sd, str(path)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_official_checkpoint_reproduces_the_official_forward(tmp_path):
    sd, path = _official_checkpoint(tmp_path)
    model = timm.create_model("inline_deit_t", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              depth=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, ref = model(x), official_deit_forward(sd, x, heads=6)
    assert ref.abs().mean() > 0.1  # the random weights give non-trivial logits
    assert _rel_err(ours, ref) <= 1e-4
    # A non-square input: the same math on a 4x6 grid, the table resized as timm resizes ViT
    # tables (bicubic with PIL-style antialiasing, which differs from plain bicubic even upwards).
    x = torch.randn(1, 3, 64, 96)
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    with torch.no_grad():
        assert _rel_err(model(x), official_deit_forward(sd, x, heads=6, pos_embed=pos)) <= 1e-4


def test_checkpoint_at_another_size_gets_its_pos_embed_resampled(tmp_path):
    sd, path = _official_checkpoint(tmp_path, grid=4, seed=1)
    model = timm.create_model("inline_deit_t", pretrained=True, pretrained_cfg_overlay=dict(file=path),
                              depth=2, img_size=96).eval()
    assert model.pos_embed.shape == (1, 1 + 36, 192)
    torch.testing.assert_close(model.pos_embed[:, :1], sd["pos_embed"][:, :1])  # the cls entry is kept
    grid = sd["pos_embed"][:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False, antialias=True)
    pos = torch.cat([sd["pos_embed"][:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert _rel_err(model(x), official_deit_forward(sd, x, heads=6, pos_embed=pos)) <= 1e-4


def test_filter_unwraps_training_containers():
    raw = official_state_dict(192, 1, 6, 2, seed=2)
    ema = official_state_dict(192, 1, 6, 2, seed=3)
    container = {"model": {"module." + k: v for k, v in raw.items()}, "state_dict_ema": ema,
                 "optimizer": {"state": {}}, "lr_scheduler": {"last_epoch": 3}, "max_accuracy": 74.5,
                 "epoch": 299, "config": object()}
    model = timm.create_model("inline_deit_t", depth=1, img_size=32)
    key = "blocks.0.attn.residual.2.weight"
    out = checkpoint_filter_fn(container, model)  # the official evaluation reads 'model'
    assert set(out) == set(model.state_dict())
    torch.testing.assert_close(out["blocks.0.attn.mixer.residual.2.weight"], raw[key])
    out_ema = checkpoint_filter_fn(container, model, prefer_ema=True)
    torch.testing.assert_close(out_ema["blocks.0.attn.mixer.residual.2.weight"], ema[key])
    # A plain official state dict, and a native one, pass.
    torch.testing.assert_close(checkpoint_filter_fn(raw, model)["pos_embed"], raw["pos_embed"])
    native = model.state_dict()
    out_native = checkpoint_filter_fn(native, model)
    assert out_native.keys() == native.keys()
    assert all(out_native[k] is native[k] for k in native)
    model.load_state_dict(out, strict=True)


def test_new_head_and_features_only_on_a_loaded_checkpoint(tmp_path):
    sd, path = _official_checkpoint(tmp_path, seed=4)
    overlay = dict(file=path)
    model = timm.create_model("inline_deit_t", pretrained=True, pretrained_cfg_overlay=overlay, depth=2,
                              img_size=64, num_classes=10).eval()
    assert model.head.weight.shape == (10, 192)
    torch.testing.assert_close(model.blocks[1].attn.mixer.residual[2].weight, sd["blocks.1.attn.residual.2.weight"])
    feats = timm.create_model("inline_deit_t", pretrained=True, pretrained_cfg_overlay=overlay, depth=2,
                              img_size=64, features_only=True, out_indices=(0, 1)).eval()
    torch.testing.assert_close(feats.model.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        outs = feats(x)
        _, ref = model.forward_intermediates(x)
    assert [tuple(o.shape) for o in outs] == [(1, 192, 4, 5)] * 2
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r)


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (40, 56)])
def test_forward_backward_small_and_non_square(size):
    model = timm.create_model("inline_deit_t", num_classes=7, drop_path_rate=0.1)
    model.set_grad_checkpointing(size == (48, 80))
    x = torch.randn(2, 3, *size, requires_grad=True)
    out = model(x)  # 40x56 is not a multiple of 16: padded to a 3x4 grid
    assert out.shape == (2, 7)
    out.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for p in (model.blocks[0].attn.mixer.residual[2].weight, model.pos_embed, model.cls_token):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_timm_api(name):
    check_vit_api(name, torch.randn(2, 3, 32, 48))


@pytest.mark.parametrize("name", NAMES)
def test_official_eval_preprocessing(name):
    _, _, img, _ = OFFICIAL[name]
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = resolve_data_config({}, model=model)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    assert cfg["interpolation"] == "bicubic" and cfg["input_size"] == (3, img, img)
    resize, crop = create_transform(**cfg).transforms[:2]
    side = (256 * img) // 224  # 256, 329, 512: a square resize, then the center crop
    assert tuple(resize.size) == (side, side) and tuple(crop.size) == (img, img)
    url = model.pretrained_cfg["url"]
    assert url.startswith("https://cloud.tsinghua.edu.cn/f/") and url.endswith("/?dl=1")


def test_bad_input_is_a_value_error():
    model = timm.create_model("inline_deit_t", depth=1)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(torch.randn(1, 3, 32, 32), attn_mask=torch.ones(1, 1))
    with pytest.raises(ValueError, match="patch_drop_rate"):
        timm.create_model("inline_deit_t", patch_drop_rate=0.1)
