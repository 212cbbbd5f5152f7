"""The fused depthwise-conv kernel (``linvision.ops``) against its PyTorch reference, and LinViT's inference
path that uses it (and its cache of folded weights) against the plain PyTorch path.

CPU: the kernel under ``TRITON_INTERPRET=1`` (fp32, fp16) on small odd shapes, strided inputs, every option.
CUDA: bf16 at model shapes, and whole models under bf16 autocast.
"""
import copy

import pytest
import timm
import torch

import linvision  # noqa: F401
from linvision.backbones.linvit import PointwiseConv
from linvision.ops import fused_depthwise_conv, fused_depthwise_conv_torch, triton_available
from linvision.ops.depthwise import output_dtype

NARROW = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), projection=64)


def _case(option, c, k, dtype, device="cpu", bsz=2, h=7, w=9):
    """Inputs of one option set; ``x`` is a channel slice of a wider channels_last tensor for LePE."""
    wide = torch.randn(bsz, 4 * c, h, w, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    x = torch.randn(bsz, c, h, w, device=device).to(dtype)
    weight = torch.randn(c, 1, k, k, device=device) * 0.3
    bias = torch.randn(c, device=device)
    kwargs = {}
    if option == "cpe_norm":
        x = x.contiguous(memory_format=torch.channels_last)
        kwargs = dict(identity=True, norm=(torch.randn(c, device=device), torch.randn(c, device=device), 1e-6))
    elif option == "lepe_gate":
        _, _, x, gate = wide.chunk(4, dim=1)
        kwargs = dict(add=torch.randn(bsz, c, h, w, device=device).to(dtype), gate=gate)
    elif option == "add_norm":
        weight, bias = None, None
        x = x.contiguous(memory_format=torch.channels_last)
        kwargs = dict(identity=True, add=torch.randn(bsz, c, h, w, device=device).to(dtype),
                      norm=(torch.randn(c, device=device), torch.randn(c, device=device), 1e-6))
    return x, weight, bias, kwargs


def _as_fp32(kwargs):
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            value = value.float()
        elif isinstance(value, tuple):
            value = tuple(v.float() if isinstance(v, torch.Tensor) else v for v in value)
        out[key] = value
    return out



@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("option,c,k", [("plain", 24, 3), ("plain", 70, 7), ("cpe_norm", 24, 3),
                                        ("cpe_norm", 96, 3), ("lepe_gate", 24, 5), ("lepe_gate", 70, 5),
                                        ("add_norm", 24, 1), ("add_norm", 130, 1)])
def test_kernel_matches_reference(option, c, k, dtype):
    if not triton_available(torch.empty(0)):
        pytest.skip("Triton kernels unavailable (no CUDA and no TRITON_INTERPRET)")
    x, weight, bias, kwargs = _case(option, c, k, dtype)
    with torch.no_grad():
        ref = fused_depthwise_conv_torch(x.float(), weight, bias, **_as_fp32(kwargs))
        out = fused_depthwise_conv(x, weight, bias, backend="triton", **kwargs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for o, r in zip(outs, refs):
        assert o.dtype == dtype and o.shape == x.shape
        assert o.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(o.float(), r, rtol=tol, atol=tol * max(r.abs().max().item(), 1.0))


def test_kernel_reads_nchw_contiguous_input():
    if not triton_available(torch.empty(0)):
        pytest.skip("Triton kernels unavailable")
    x = torch.randn(1, 10, 5, 6)            # default (NCHW) strides
    weight, bias = torch.randn(10, 1, 3, 3), torch.randn(10)
    with torch.no_grad():
        torch.testing.assert_close(fused_depthwise_conv(x, weight, bias, backend="triton"),
                                   fused_depthwise_conv_torch(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_reference_is_the_unfused_function():
    """The reference itself against the ops it replaces, written out."""
    x, weight, bias, kwargs = _case("lepe_gate", 8, 5, torch.float32)
    manual = (kwargs["add"] + torch.nn.functional.conv2d(x, weight, bias, padding=2, groups=8)) * kwargs["gate"]
    torch.testing.assert_close(fused_depthwise_conv_torch(x, weight, bias, **kwargs), manual)
    x, weight, bias, _ = _case("plain", 8, 3, torch.float32)
    torch.testing.assert_close(fused_depthwise_conv_torch(x, weight, bias, identity=True),
                               x + torch.nn.functional.conv2d(x, weight, bias, padding=1, groups=8))
    add = torch.randn_like(x)
    torch.testing.assert_close(fused_depthwise_conv_torch(x, None, None, identity=True, add=add), add + x)


def test_auto_is_the_reference_when_autograd_records_or_on_cpu():
    x, weight, bias, _ = _case("plain", 6, 3, torch.float32)
    x.requires_grad_()
    out = fused_depthwise_conv(x, weight, bias)          # CPU tensors: the reference, differentiable
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_auto_is_the_reference_under_fake_tensors():
    """Fake CUDA tensors (shape propagation, MAC counting; no GPU needed) have no memory for the kernel."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    with FakeTensorMode(), torch.no_grad():
        x = torch.empty(2, 8, 5, 7, device="cuda").contiguous(memory_format=torch.channels_last)
        y, h = fused_depthwise_conv(x, torch.empty(8, 1, 3, 3, device="cuda"), torch.empty(8, device="cuda"),
                                    identity=True, norm=(torch.empty(8, device="cuda"), torch.empty(8, device="cuda"),
                                                         1e-6))
    assert isinstance(y, FakeTensor) and y.shape == h.shape == x.shape and y.device.type == "cuda"


def test_triton_path_refuses_to_record_a_graph():
    if not triton_available(torch.empty(0)):
        pytest.skip("Triton kernels unavailable")
    x, weight, bias, _ = _case("plain", 6, 3, torch.float32)
    with pytest.raises(ValueError, match="forward only"):
        fused_depthwise_conv(x.requires_grad_(), weight, bias, backend="triton")


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(6, 5, 5)), r"x must be \(B, C, H, W\)"),
    (dict(weight=torch.randn(6, 1, 4, 4)), "k odd"),
    (dict(weight=torch.randn(5, 1, 3, 3)), r"depthwise kernel \(6, 1, k, k\)"),
    (dict(bias=torch.randn(5)), r"bias must have shape \(6,\)"),
    (dict(add=torch.randn(1, 6, 4, 5)), "add must have x's shape"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_input_one_line_errors(bad, match):
    args = dict(x=torch.randn(1, 6, 5, 5), weight=torch.randn(6, 1, 3, 3), bias=torch.randn(6))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        fused_depthwise_conv(**args)


def test_output_dtype_follows_autocast():
    x = torch.randn(1, 4, 3, 3)
    assert output_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert output_dtype(x) == torch.bfloat16


@pytest.mark.parametrize("name", ["linvit_t", "mavit_t"])
def test_fused_inference_matches_plain_model(name):
    if not triton_available(torch.empty(0)):
        pytest.skip("Triton kernels unavailable")
    plain = timm.create_model(name, num_classes=7, fused_backend="torch", **NARROW).eval()
    fused = timm.create_model(name, num_classes=7, fused_backend="triton", **NARROW).eval()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 36)
    with torch.no_grad():
        ref = plain(x)
        out = fused(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # Where autograd records (training), the fused model runs the PyTorch ops: same output and gradients.
    x.requires_grad_()
    ref_grad = torch.autograd.grad(plain(x).sum(), x)[0]
    out_grad = torch.autograd.grad(fused(x).sum(), x)[0]
    torch.testing.assert_close(out_grad, ref_grad)


def test_fused_backend_option_is_checked():
    with pytest.raises(ValueError, match="fused_backend must be one of"):
        timm.create_model("linvit_t", fused_backend="fast", **NARROW)


def test_inference_fold_cache_follows_parameter_changes():
    """Folded (layer scale, input bias) weights are kept between no-grad calls; an in-place change of any
    of their inputs (optimizer step, load_state_dict) must refold."""
    conv = PointwiseConv(6, 4).to(memory_format=torch.channels_last)
    torch.nn.init.normal_(conv.bias)
    scale, input_bias = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(6)
    x = torch.randn(2, 6, 3, 5).contiguous(memory_format=torch.channels_last)

    def expected():
        w = conv.weight.reshape(4, 6)
        return (torch.einsum("oi,bihw->bohw", w, x + input_bias[None, :, None, None])
                + conv.bias[None, :, None, None]) * scale

    with torch.no_grad():
        first = conv(x, scale=scale, input_bias=input_bias)
        torch.testing.assert_close(first, expected(), rtol=1e-5, atol=1e-5)
        for tensor in (conv.weight, conv.bias, scale, input_bias):
            tensor.mul_(1.5)
            torch.testing.assert_close(conv(x, scale=scale, input_bias=input_bias), expected(), rtol=1e-5,
                                       atol=1e-5)
    assert conv(x, scale=scale, input_bias=input_bias).requires_grad     # with grad: folded afresh, differentiable
    assert "_inference_fold" in conv.__dict__ and "_inference_fold" not in copy.deepcopy(conv).__dict__


def test_inference_fold_cache_casts_once_for_autocast():
    conv = PointwiseConv(6, 4).to(memory_format=torch.channels_last)
    x = torch.randn(1, 6, 2, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, scale=torch.ones(1, 4, 1, 1))
        weight, bias = conv.__dict__["_inference_fold"][1]
    assert out.dtype == weight.dtype == bias.dtype == torch.bfloat16
    with torch.no_grad():
        assert conv(x, scale=torch.ones(1, 4, 1, 1)).dtype == torch.float32   # another dtype: refolded


@pytest.mark.cuda
@pytest.mark.parametrize("option,c,k", [("cpe_norm", 96, 3), ("cpe_norm", 512, 3), ("lepe_gate", 192, 5),
                                        ("add_norm", 384, 1),
                                        ("plain", 1792, 3)])
def test_kernel_bf16_cuda(option, c, k):
    x, weight, bias, kwargs = _case(option, c, k, torch.bfloat16, device="cuda", bsz=2, h=33, w=47)
    with torch.no_grad():
        ref = fused_depthwise_conv_torch(x.float(), weight, bias, **_as_fp32(kwargs))
        out = fused_depthwise_conv(x, weight, bias, backend="triton", **kwargs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        assert o.dtype == torch.bfloat16
        # one bf16 rounding of the result (inputs are bf16 in both)
        torch.testing.assert_close(o.float(), r, rtol=1.6e-2, atol=1.6e-2 * r.abs().max().item())


@pytest.mark.cuda
def test_auto_takes_the_reference_when_only_the_norm_parameters_need_gradients():
    x, weight, bias, kwargs = _case("cpe_norm", 16, 3, torch.float32, device="cuda")
    norm_weight = kwargs["norm"][0].requires_grad_()
    _, normed = fused_depthwise_conv(x, weight, bias, **kwargs)     # auto: must not pick the forward-only kernel
    normed.sum().backward()
    assert norm_weight.grad is not None


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["linvit_t", "mavit_t", "linvit_b"])
def test_fused_inference_matches_plain_model_cuda_bf16(name):
    plain = timm.create_model(name, fused_backend="torch").cuda().eval()
    fused = timm.create_model(name).cuda().eval()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 256, 192, device="cuda")
    with torch.inference_mode():
        ref32 = plain(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = plain(x).float()
            out = fused(x).float()
    # The fused model is as close to the fp32 model as the plain bf16 model is (both round every layer).
    err_fused = (out - ref32).norm() / ref32.norm()
    err_plain = (ref - ref32).norm() / ref32.norm()
    assert err_fused <= 1.5 * err_plain + 1e-3, (err_fused.item(), err_plain.item())
