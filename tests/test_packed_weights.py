"""LinViT's training path with stage-packed weights (``pack_stage_weights``) against the per-layer path.

Packing changes how the blocks' weights are cast and folded, never the function: outputs and every
parameter's gradient must equal those of the per-layer ops (``pack_weights=False``), in fp32
and under bf16 autocast, with the parameters' own strides (DDP copies a gradient whose strides differ).
Outside training a block keeps its own weights between calls; any parameter change must rebuild them.
"""
import copy

import pytest
import timm
import torch

import linvision  # noqa: F401
from linvision.backbones.linvit import BlockWeights, LinViTStage, pack_stage_weights

NARROW = dict(depths=(2, 1, 3, 1), embed_dims=(16, 32, 48, 64), num_heads=(1, 2, 3, 4), projection=64)


def per_layer(model, fn):
    """``fn()`` with ``model``'s stages on the per-layer path; packing back on afterwards."""
    for stage in model.stages:
        stage.pack_weights = False
    try:
        return fn()
    finally:
        for stage in model.stages:
            stage.pack_weights = True


def _model(name="linvit_t", **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0, **dict(NARROW, **kwargs))
    with torch.no_grad():   # layer scales, biases and LN affines away from their init values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.train()


def _step(model, amp=False, checkpointing=False):
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = model(x)
    y.float().square().sum().backward()
    return y.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_grads_close(ref, got, rtol):
    assert ref.keys() == got.keys()
    scale = max(g.abs().max() for g in ref.values())
    for name in ref:
        # Relative to the largest gradient: the biases in front of a BatchNorm have near-zero gradients.
        err = (ref[name] - got[name]).abs().max() / scale
        assert err < rtol, f"{name}: {err:.2e}"


@pytest.mark.parametrize("name", ["linvit_t", "mavit_t", "linvit_t_focused"])
def test_packed_training_step_equals_per_layer_fp32(name):
    model = _model(name)
    y0, g0 = per_layer(model, lambda: _step(model))
    y1, g1 = _step(model)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g0, g1, rtol=1e-5)


def test_packed_training_step_equals_per_layer_bf16_autocast():
    model = _model()
    y0, g0 = per_layer(model, lambda: _step(model, amp=True))
    y1, g1 = _step(model, amp=True)
    # The same casts and folds: equal up to the order of fp32 operations in the fold gradients.
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    _assert_grads_close(g0, g1, rtol=1e-5)


def test_packed_with_grad_checkpointing():
    model = _model()
    y0, g0 = per_layer(model, lambda: _step(model, checkpointing=True))
    y1, g1 = _step(model, checkpointing=True)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g0, g1, rtol=1e-5)


def test_packed_gradients_have_the_parameters_strides():
    model = _model()
    _step(model)
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_packed_weights_are_in_the_compute_dtype_with_the_folds_applied():
    model = _model()
    stage = model.stages[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights = pack_stage_weights(stage.blocks, torch.bfloat16)
    assert len(weights) == len(stage.blocks) and all(isinstance(w, BlockWeights) for w in weights)
    blk, w = stage.blocks[1], weights[1]
    assert all(t.dtype == torch.bfloat16 for t in w)
    gamma1, gamma2 = blk.gamma_1.reshape(-1, 1), blk.gamma_2.reshape(-1)
    proj = blk.attn.proj.weight.reshape(blk.attn.proj.weight.shape[:2])
    fc2 = blk.mlp.fc2.weight.reshape(blk.mlp.fc2.weight.shape[:2])
    expected = {
        "proj_weight": proj * gamma1,
        "proj_bias": blk.attn.proj.bias * gamma1[:, 0],
        "fc2_weight": fc2 * gamma2[:, None],
        "fc2_bias": (blk.mlp.fc2.bias + fc2 @ blk.mlp.dwconv.bias) * gamma2,
        "cpe_weight": blk.cpe.weight + blk.cpe.centre,
        "dw_weight": blk.mlp.dwconv.weight + blk.mlp.dwconv.centre,
        "norm2_weight": blk.norm2.weight,
    }
    for field, value in expected.items():
        torch.testing.assert_close(getattr(w, field), value.detach().to(torch.bfloat16), rtol=0, atol=0,
                                   msg=field)
    assert w.cpe_weight.stride() == blk.cpe.weight.stride()


def test_frozen_parameters_get_no_gradient():
    model = _model()
    for p in model.stages[1].parameters():
        p.requires_grad_(False)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.stages[1].parameters())
    assert all(p.grad is not None for p in model.stages[2].parameters())


def test_pack_weights_model_argument():
    packed, plain = _model(), _model(pack_weights=False)
    assert all(s.pack_weights for s in packed.stages) and not any(s.pack_weights for s in plain.stages)
    y0, g0 = _step(plain)
    y1, g1 = _step(packed)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    _assert_grads_close(g0, g1, rtol=1e-5)


def test_only_training_packs(monkeypatch):
    model = _model().eval()
    calls = []
    original = LinViTStage._packed_weights

    def spy(self, x):
        out = original(self, x)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(LinViTStage, "_packed_weights", spy)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    model.train()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert calls == [False] * 4 + [True] * 4


def test_block_inference_weights_follow_parameter_changes():
    """Outside training a block keeps its BlockWeights between calls; an in-place change of any parameter
    (optimizer step, load_state_dict) must rebuild them, and a grad-recording call never uses them."""
    model = _model().eval()
    block, stage = model.stages[1].blocks[0], model.stages[1]
    x = torch.randn(1, 3, 32, 32)
    reference = copy.deepcopy(model)
    assert "_inference_weights" not in reference.stages[1].blocks[0].__dict__
    with torch.no_grad():
        model(x)
        first = block.__dict__["_inference_weights"][1]
        assert block.block_weights(stage.downsample(model.stem(x))) is first   # kept
        for p in (block.gamma_1, block.mlp.dwconv.bias, block.attn.qkvo.weight, block.norm2.bias):
            p.mul_(1.5)
            reference.load_state_dict(model.state_dict())
            _clear_cached_weights(reference)
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert model(x).requires_grad   # with grad: the per-layer ops, differentiable
    assert "_inference_weights" not in block.__dict__    # and the kept weights are let go


def test_block_inference_weights_in_the_autocast_dtype():
    model = _model().eval()
    block = model.stages[0].blocks[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(1, 3, 32, 32))
    assert all(t.dtype == torch.bfloat16 for t in block.__dict__["_inference_weights"][1])
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert all(t.dtype == torch.float32 for t in block.__dict__["_inference_weights"][1])


def test_counting_under_fake_tensors_keeps_nothing():
    """Counting MACs (FakeTensorMode + FlopCounterMode) before any real call must not leave fake weights
    behind under the real parameters' key: the next real forward would compute with them and return a fake
    tensor. Under a dispatch mode nothing is kept, and kept real weights are not read either."""
    from torch._subclasses.fake_tensor import FakeTensor

    from linvision.complexity import model_complexity
    model = _model().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(1, 3, 32, 32)
    macs = model_complexity(model, (3, 32, 32))["gmacs"]
    assert all("_inference_weights" not in m.__dict__ and "_inference_fold" not in m.__dict__
               for m in model.modules())
    with torch.no_grad():
        out = model(x)
        assert type(out) is torch.Tensor and not isinstance(out, FakeTensor)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    assert model_complexity(model, (3, 32, 32))["gmacs"] == macs     # with real weights kept: the same count
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)
    # The fused inference kernels step aside under the counter: the same MACs with them on.
    fused = _model(fused_backend="triton").eval()
    assert model_complexity(fused, (3, 32, 32))["gmacs"] == macs


def _clear_cached_weights(model):
    for module in model.modules():
        module.__dict__.pop("_inference_weights", None)
