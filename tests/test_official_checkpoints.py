"""Official MAViT/RAVLT checkpoints load through timm and reproduce the official logits.

The official weights cannot be downloaded here, so each test writes an official-format state
dict with random weights (official key names, official shapes), loads it with
``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` and compares
with an independent functional implementation of the official forward (tests/official_reference.py).
"""
import math
import re

import pytest
import safetensors.torch
import timm
import torch

import linvision  # noqa: F401  (registers the models)
from official_reference import official_forward

CONFIGS = {
    "mavit_t": ((2, 2, 6, 2), (1, 2, 4, 8), "mala"),
    "ravlt_t": ((2, 2, 6, 2), (1, 2, 4, 8), "rala"),
    "mavit_b": ((4, 6, 12, 6), (1, 2, 6, 8), "mala"),
}


def _to_official_key(k: str) -> str:
    """Inverse of the checkpoint filter's renames (written independently, for the tests)."""
    m = re.match(r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", k)
    if m:
        return f"layers.{int(m.group(1)) - 1}.downsample.{'reduction' if m.group(2) == 'conv' else 'norm'}.{m.group(3)}"
    k = re.sub(r"^stem\.", "patch_embed.proj.", k)
    k = re.sub(r"^stages\.(\d+)\.rope\.angle$", r"layers.\1.RoPE.angle", k)
    k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.cpe\.", r"layers.\1.blocks.\2.pos.", k)
    k = re.sub(r"\.norm([12])\.", r".norm\1.norm.", k)
    k = re.sub(r"\.mlp\.", ".ffn.", k)
    k = re.sub(r"^stages\.", "layers.", k)
    k = re.sub(r"^conv_head\.", "proj.", k)
    k = re.sub(r"^norm_head\.", "norm.", k)
    return k


def official_state_dict(name: str, seed: int = 0):
    """A random official-format state dict for ``name`` (values scaled to keep activations O(1))."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in timm.create_model(name).state_dict().items():
        if k.endswith("angle") or k.endswith("num_batches_tracked"):
            val = v.clone()
        elif k.endswith("running_var"):
            val = torch.rand(v.shape, generator=g) + 0.5
        elif k.endswith("gamma_1") or k.endswith("gamma_2"):
            val = torch.rand(v.shape, generator=g) * 0.5 + 0.25
        elif v.dim() >= 2:
            fan_in = v[0].numel()
            val = torch.randn(v.shape, generator=g) / math.sqrt(fan_in)
        elif k.endswith("weight"):
            val = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            val = 0.1 * torch.randn(v.shape, generator=g)
        key = _to_official_key(k)
        if key == "head.weight":
            val = val[:, :, None, None]  # the official classifier is a 1x1 conv
        out[key] = val
    return out


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_logits_reproduced(tmp_path, name):
    depths, heads, linear = CONFIGS[name]
    sd = official_state_dict(name)
    assert len(sd) == {"mavit_t": 302, "ravlt_t": 302, "mavit_b": 622}[name]  # official key counts
    path = tmp_path / f"{name}.pth"
    torch.save({"model": sd, "epoch": 299}, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        ours = model(x)
        ref = official_forward(sd, x, depths, heads, linear)
    assert ref.abs().mean() > 0.1  # the random weights give non-trivial logits
    assert _rel_err(ours, ref) <= 1e-4


@pytest.mark.parametrize("wrapper", ["state_dict_ema", "plain_safetensors", "module_prefix"])
def test_checkpoint_formats(tmp_path, wrapper):
    sd = official_state_dict("ravlt_t", seed=1)
    if wrapper == "state_dict_ema":
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict_ema": sd}, path)
    elif wrapper == "plain_safetensors":
        path = tmp_path / "ckpt.safetensors"
        safetensors.torch.save_file(sd, str(path))
    else:
        path = tmp_path / "ckpt.pth"
        torch.save({"model": {"module." + k: v for k, v in sd.items()}}, path)
    model = timm.create_model("ravlt_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert _rel_err(model(x), official_forward(sd, x, (2, 2, 6, 2), (1, 2, 4, 8), "rala")) <= 1e-4


def test_pretrained_with_new_head_and_features_only(tmp_path):
    sd = official_state_dict("mavit_t", seed=2)
    path = tmp_path / "mavit_t.pth"
    torch.save({"model": sd}, path)
    overlay = dict(file=str(path))
    model = timm.create_model("mavit_t", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=10)
    assert model.head.weight.shape == (10, 2048)
    torch.testing.assert_close(model.stem[0].weight, sd["patch_embed.proj.0.weight"])
    feats = timm.create_model("mavit_t", pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    torch.testing.assert_close(feats.model.stages[3].blocks[1].attn.qkvo.weight, sd["layers.3.blocks.1.attn.qkvo.weight"])
    torch.testing.assert_close(feats.model.stages[1].downsample.conv.weight, sd["layers.0.downsample.reduction.weight"])
    outs = feats(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 128, 256, 512]


def test_checkpoint_with_missing_keys_is_a_clear_error(tmp_path):
    sd = official_state_dict("mavit_t")
    del sd["layers.1.blocks.0.attn.qkvo.weight"]
    path = tmp_path / "broken.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=r"missing keys stages\.1\.blocks\.0\.attn\.qkvo\.weight"):
        timm.create_model("mavit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_wrong_family_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "ravlt.pth"
    torch.save({"model": official_state_dict("ravlt_t")}, path)  # projection 1024, MAViT expects 2048
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("mavit_t", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
