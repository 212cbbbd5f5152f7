"""Whole models on the Triton path against the same models on the PyTorch path (same weights, same input).

CPU: narrow one-block-per-stage LinViTs of every mechanism at 32×32 under ``TRITON_INTERPRET=1`` (fp32: both
paths accumulate in fp32, so logits and input gradients agree to fp32 rounding amplified by the depth).
CUDA: every mechanism's ``linvit_t_*`` at 224×224, fp32 and under bf16 autocast; in bf16 the Triton model must
be about as close to the fp32 reference model as the PyTorch-path model is (both round every layer to bf16).
"""
import os

os.environ.setdefault("LINVISION_TRITON_AUTOTUNE", "0")

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402

import linvision  # noqa: E402

MECHANISMS = sorted(set(linvision.attn.MIXERS) - {"softmax"})
NARROW = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), projection=64)


def _name(mechanism, size="t"):
    return f"linvit_{size}" if mechanism == "mala" else f"linvit_{size}_{mechanism}"


def set_backend(model, backend):
    """Point every token mixer of ``model`` at ``backend`` ("torch" or "triton"); returns how many."""
    mixers = [m for m in model.modules() if hasattr(m, "backend") and isinstance(m.backend, str)]
    for m in mixers:
        m.backend = backend
    return len(mixers)


def _run(model, x, backend, autocast_dtype=None):
    set_backend(model, backend)
    x = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        out = model(x)
    out.float().square().sum().backward()
    return out.detach().float(), x.grad.detach().float()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_triton_model_matches_torch_model_cpu_interpreter(mechanism):
    torch.manual_seed(0)
    model = timm.create_model(_name(mechanism), num_classes=5, **NARROW).eval()
    assert set_backend(model, "torch") >= 4
    x = torch.randn(2, 3, 32, 32)
    ref_out, ref_grad = _run(model, x, "torch")
    out, grad = _run(model, x, "triton")
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().mean().item())
    assert _rel(grad, ref_grad) < 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_triton_model_matches_torch_model_cuda(mechanism, monkeypatch):
    # cuDNN picks its conv algorithms per run and uses TF32 for fp32 convs by default: two runs of the
    # same fp32 model then differ by ~1e-3 whatever the attention backend. Both off: only the attention
    # backend differs between the two runs below.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = timm.create_model(_name(mechanism), num_classes=1000).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    ref_out, ref_grad = _run(model, x, "torch")
    out, grad = _run(model, x, "triton")
    assert _rel(out, ref_out) < 1e-4 and _rel(grad, ref_grad) < 1e-3, (_rel(out, ref_out), _rel(grad, ref_grad))
    # bf16 autocast: both paths round every projection to bf16; the kernels' bf16 operands must not add
    # more than the PyTorch path's own error does (u_bf16 = 2^-8 ≈ 4e-3 per rounding).
    torch_out, torch_grad = _run(model, x, "torch", torch.bfloat16)
    tri_out, tri_grad = _run(model, x, "triton", torch.bfloat16)
    for name, tri, ref_bf16, ref32 in (("logits", tri_out, torch_out, ref_out), ("dx", tri_grad, torch_grad, ref_grad)):
        err_torch, err_tri = _rel(ref_bf16, ref32), _rel(tri, ref32)
        assert torch.isfinite(tri).all(), name
        assert err_tri <= 2 * err_torch + 2 ** -8, f"{name}: triton bf16 error {err_tri:.3g}, torch bf16 {err_torch:.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_triton_model_at_1024x1024_bf16_close_to_fp32_cuda(mechanism):
    """A 1024×1024 image (65536 tokens in stage 1) under bf16 autocast: the Triton model stays within bf16
    rounding of the fp32 PyTorch-path model (no overflow, no lost normaliser)."""
    torch.manual_seed(0)
    model = timm.create_model(_name(mechanism)).cuda().eval()
    x = torch.randn(1, 3, 1024, 1024, device="cuda")
    with torch.no_grad():
        set_backend(model, "torch")
        ref = model(x).float()
        set_backend(model, "triton")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x).float()
        set_backend(model, "torch")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            torch_bf16 = model(x).float()
    assert torch.isfinite(out).all()
    assert _rel(out, ref) <= 2 * _rel(torch_bf16, ref) + 2 ** -8, (_rel(out, ref), _rel(torch_bf16, ref))
