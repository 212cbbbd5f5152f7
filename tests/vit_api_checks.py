"""timm API checks shared by the ViT-hosted families (InLine-DeiT, InfViT)."""
from __future__ import annotations

import timm
import torch
from timm.optim import create_optimizer_v2


def check_vit_api(name: str, x: torch.Tensor, **overrides) -> None:
    """Every timm model-API method on ``timm.create_model(name, **overrides)`` for images ``x``.

    ``x`` must be ``(B, 3, 16·h, 16·w)``; the grid ``h×w`` is checked in every output.
    """
    model = timm.create_model(name, **overrides).eval()
    b, gh, gw = x.shape[0], x.shape[-2] // 16, x.shape[-1] // 16
    e = model.embed_dim
    cfg = model.pretrained_cfg
    assert model.num_classes == cfg["num_classes"] == 1000
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd
    assert {"pos_embed", "cls_token"} <= model.no_weight_decay()
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (b, 1 + gh * gw, e)
        pre = model.forward_head(feat, pre_logits=True)
        assert pre.shape == (b, model.head_hidden_size)
        logits = model(x)
        assert logits.shape == (b, 1000) and torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model.forward_head(feat))
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, feat)
        assert len(inter) == len(model.blocks) and all(t.shape == (b, e, gh, gw) for t in inter)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert len(last2) == 2
        torch.testing.assert_close(last2[-1], inter[-1])
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], inter[0])
        nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", return_prefix_tokens=True,
                                         intermediates_only=True)
        tokens, prefix = nlc[0]
        assert tokens.shape == (b, gh * gw, e) and prefix.shape == (b, 1, e)
    assert model.get_classifier() is model.head
    assert set(model.group_matcher()) == {"stem", "blocks"}
    create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)  # uses group_matcher

    # Gradient checkpointing computes the same function (drop path is off in eval mode).
    model.set_grad_checkpointing(True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits)
    model.set_grad_checkpointing(False)

    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (b, 5)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (b, model.head_hidden_size)

    feats = timm.create_model(name, features_only=True, out_indices=(0, 1), **overrides).eval()
    assert feats.feature_info.channels() == [e, e]
    assert feats.feature_info.reduction() == [16, 16]
    with torch.no_grad():
        outs = feats(x)
    assert [tuple(o.shape) for o in outs] == [(b, e, gh, gw)] * 2
