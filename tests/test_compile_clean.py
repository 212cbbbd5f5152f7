"""Whole LinViT-family models trace into one graph with no graph breaks (``torch._dynamo.explain``), in training
mode with autograd recording and in eval mode without: ``torch.compile`` and CUDA graphs then see the whole
forward. Their eager-only shortcuts (the fused inference kernels, the cache of folded weights) step aside while
Dynamo traces, and the Triton attention path is a custom op.
"""
import pytest
import timm
import torch
import torch._dynamo

import linvision

NARROW = dict(depths=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64), num_heads=(1, 1, 2, 2), projection=64)
MECHANISMS = sorted(set(linvision.attn.MIXERS) - {"softmax"})


def _explain(model, x, grad):
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        return torch._dynamo.explain(model)(x)


@pytest.mark.parametrize("name,mode", [("mavit_t", "train"), ("mavit_t", "eval"), ("linvit_t", "eval")] + [
    ("linvit_t" if m == "mala" else f"linvit_t_{m}", "train") for m in MECHANISMS] + [("ravlt_t", "train")])
def test_no_graph_breaks(name, mode):
    model = getattr(timm.create_model(name, num_classes=5, **NARROW), mode)()
    explained = _explain(model, torch.randn(2, 3, 32, 32), grad=mode == "train")
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_no_graph_breaks_on_the_triton_attention_path():
    """The Triton attention backend (under the interpreter on CPU) enters the graph as one custom op."""
    model = timm.create_model("linvit_t", num_classes=5, attn_kwargs=dict(backend="triton"),
                              fused_backend="triton", **NARROW).train()
    explained = _explain(model, torch.randn(2, 3, 32, 32), grad=True)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
