"""Parameter and multiply-accumulate counts of a model at a given input size."""
from __future__ import annotations

from typing import Dict, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["model_complexity"]


def model_complexity(model: nn.Module, input_size: Sequence[int] = (3, 224, 224)) -> Dict[str, float]:
    """``{'params': int, 'gmacs': float}`` for one image of ``input_size`` (C, H, W).

    GMACs come from torch's ``FlopCounterMode`` (matmuls, convolutions and SDPA; one multiply-add
    counts once, like fvcore). Elementwise ops and norms are not counted, so expect numbers a few
    percent under fvcore's, which also counts norms.
    """
    params = sum(p.numel() for p in model.parameters())
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    return {"params": params, "gmacs": counter.get_total_flops() / 2e9}
