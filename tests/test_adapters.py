"""Dense-prediction adapters on CPU: torchvision detectors/segmenters, the mm backbone, the configs.

Coverage of the detection grid (each cell: one training step with losses + backward, then a
prediction, on a 256×320 image):

* ``linvit_t``: Faster R-CNN, Mask R-CNN, RetinaNet, FCOS;
* ``mavit_t``, ``ravlt_t`` (official MALA / RALA hybrids): Faster R-CNN, Mask R-CNN, RetinaNet;
* one LinViT per other mechanism, one detector each, rotated so every detector meets several
  mechanisms: focused → Faster R-CNN, inline → Mask R-CNN, qt → RetinaNet, mirror → Mask R-CNN,
  infsa → Faster R-CNN.

mmdet/mmseg are not dependencies of the project (they need a from-source mmcv build), so the mm side
is tested through mmengine alone: registry build, init_cfg loading (official classification,
official dense and our own detector checkpoints), freezing, norm_eval, the configs (parse + backbone
build + channel agreement) and their optimizer rules.
"""
import glob
import importlib.util
import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

import linvision  # noqa: F401
from linvision.adapters import DenseBackbone
from linvision.adapters import torchvision as tva
from official_reference import _attention, _bn, _conv, _ln2d, _rope_tables
from test_official_checkpoints import official_state_dict

ROOT = Path(__file__).resolve().parents[1]
H, W = 256, 320
DETECTORS = {"fasterrcnn": tva.fasterrcnn, "maskrcnn": tva.maskrcnn, "retinanet": tva.retinanet, "fcos": tva.fcos}
GRID = (
    [("linvit_t", d) for d in ("fasterrcnn", "maskrcnn", "retinanet", "fcos")]
    + [(m, d) for m in ("mavit_t", "ravlt_t") for d in ("fasterrcnn", "maskrcnn", "retinanet")]
    + [("linvit_t_focused", "fasterrcnn"), ("linvit_t_inline", "maskrcnn"), ("linvit_t_qt", "retinanet"),
       ("linvit_t_mirror", "maskrcnn"), ("linvit_t_infsa", "fasterrcnn")]
)
MECHANISM_MODELS = ["linvit_t", "mavit_t", "ravlt_t", "linvit_t_focused", "linvit_t_inline", "linvit_t_qt",
                    "linvit_t_mirror", "linvit_t_infsa"]


def _targets(with_masks: bool):
    boxes = torch.tensor([[10.0, 20.0, 110.0, 140.0], [150.0, 60.0, 300.0, 230.0], [40.0, 150.0, 90.0, 250.0]])
    t = dict(boxes=boxes, labels=torch.tensor([1, 2, 3]))
    if with_masks:
        masks = torch.zeros(3, H, W, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        t["masks"] = masks
    return t


# ---------------------------------------------------------------------------------- torchvision detection
@pytest.mark.parametrize("name,detector", GRID, ids=[f"{m}-{d}" for m, d in GRID])
def test_torchvision_detector_trains_and_predicts(name, detector):
    # Score threshold 0: an untrained detector still returns boxes, so their values are always checked.
    limit = (dict(detections_per_img=10, score_thresh=0.0) if detector in ("retinanet", "fcos")
             else dict(box_detections_per_img=10, box_score_thresh=0.0))
    model = DETECTORS[detector](name, num_classes=4, min_size=H, max_size=W, **limit)
    body = model.backbone.body
    assert isinstance(body, DenseBackbone) and model.backbone.out_channels == 256
    assert body.out_indices == ((1, 2, 3) if detector in ("retinanet", "fcos") else (0, 1, 2, 3))
    image = torch.rand(3, H, W)

    model.train()
    losses = model([image], [_targets(detector == "maskrcnn")])
    expected = {"fasterrcnn": 4, "maskrcnn": 5, "retinanet": 2, "fcos": 3}[detector]
    assert len(losses) == expected and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    no_grad = [n for n, p in body.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"backbone parameters without gradient: {no_grad[:5]}"

    model.eval()
    with torch.no_grad():
        (pred,) = model([image])
    n = pred["boxes"].shape[0]
    assert 0 < n <= 10 and pred["boxes"].shape == (n, 4) and pred["scores"].shape == (n,) and pred["labels"].shape == (n,)
    x1, y1, x2, y2 = pred["boxes"].unbind(1)
    assert (0 <= x1).all() and (x1 <= x2).all() and (x2 <= W).all(), pred["boxes"]
    assert (0 <= y1).all() and (y1 <= y2).all() and (y2 <= H).all(), pred["boxes"]
    assert ((0 <= pred["scores"]) & (pred["scores"] <= 1)).all() and (pred["scores"][:-1] >= pred["scores"][1:]).all()
    assert ((1 <= pred["labels"]) & (pred["labels"] < 4)).all()  # 0 is the background
    if detector == "maskrcnn":
        assert pred["masks"].shape == (n, 1, H, W)


def test_detector_defaults_match_torchvision():
    """Anchors/poolers derived from the FPN levels equal torchvision's ResNet-50 defaults."""
    frcnn = tva.fasterrcnn("linvit_t", num_classes=3)
    assert frcnn.rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    assert frcnn.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2", "3"]
    retina = tva.retinanet("linvit_t", num_classes=3)
    assert retina.anchor_generator.sizes == tuple((x, int(x * 2 ** (1 / 3)), int(x * 2 ** (2 / 3)))
                                                  for x in (32, 64, 128, 256, 512))
    assert retina.backbone.strides == [8, 16, 32, 64, 128]
    # Other out_indices adapt anchors and RoI pooling to the levels actually built.
    small = tva.fasterrcnn("linvit_t", num_classes=3, out_indices=(1, 2, 3))
    assert small.rpn.anchor_generator.sizes == ((64,), (128,), (256,), (512,))
    assert small.roi_heads.box_roi_pool.featmap_names == ["0", "1", "2"]


def test_detector_at_odd_image_size():
    model = tva.fasterrcnn("linvit_t", num_classes=3, min_size=203, max_size=301, box_detections_per_img=5).eval()
    with torch.no_grad():
        (pred,) = model([torch.rand(3, 203, 277)])
    assert pred["boxes"].shape[1] == 4


# ---------------------------------------------------------------------------------- segmentation
@pytest.mark.parametrize("head", ["fpn", "upernet"])
def test_segmentation_trains_at_256(head):
    # UPerNet with 128 instead of 512 head channels keeps the CPU step short; the structure is the same.
    model = (tva.semantic_fpn("linvit_t", num_classes=5, aux=True) if head == "fpn"
             else tva.upernet("linvit_t", num_classes=5, aux=True, channels=128))
    x = torch.randn(2, 3, 256, 256)
    target = torch.randint(0, 5, (2, 256, 256))
    target[:, :8] = 255  # ignored
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    out = model(x)
    assert out["out"].shape == (2, 5, 256, 256) and out["aux"].shape == (2, 5, 256, 256)
    loss = tva.segmentation_loss(out, target)
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        odd = model(torch.randn(1, 3, 97, 131))
    assert odd["out"].shape == (1, 5, 97, 131)


def test_segmentation_loss_on_a_hand_computed_case():
    """2×2 image, 2 classes: logits (0, ln 3) at every pixel give p(class 1) = 3/4; one pixel ignored; the aux
    output is weighted by 0.4."""
    import math
    out = torch.zeros(1, 2, 2, 2)
    out[:, 1] = math.log(3.0)
    target = torch.tensor([[[1, 0], [1, 255]]])
    main = (2 * -math.log(0.75) - math.log(0.25)) / 3       # two pixels of class 1, one of class 0
    assert tva.segmentation_loss({"out": out}, target).item() == pytest.approx(main, rel=1e-6)
    aux = torch.zeros(1, 2, 2, 2)                            # uniform: ln 2 per pixel
    both = tva.segmentation_loss({"out": out, "aux": aux}, target).item()
    assert both == pytest.approx(main + 0.4 * math.log(2.0), rel=1e-6)


def test_segmentation_without_aux_and_with_mm_like_options():
    model = tva.upernet("mavit_t", num_classes=3, aux=False, frozen_stages=1, norm_eval=True).train()
    out = model(torch.randn(2, 3, 96, 128))
    assert list(out) == ["out"] and out["out"].shape == (2, 3, 96, 128)
    assert not model.backbone.features.model.stem[1].training


# ---------------------------------------------------------------------------------- any resolution
@pytest.mark.parametrize("name", MECHANISM_MODELS)
def test_finetune_at_another_resolution(tmp_path, name):
    """A classification checkpoint (trained at 224) loads into the dense backbone unchanged and runs at
    other, odd sizes: no parameter or buffer depends on the input size."""
    cls = timm.create_model(name).eval()
    path = tmp_path / "cls.pth"
    torch.save({"model": cls.state_dict()}, path)
    dense = DenseBackbone(name, checkpoint=path, out_norms=False).eval()
    for size in [(320, 256), (97, 131)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            feats = dense(x)
            ref = cls.forward_intermediates(x, intermediates_only=True)
        for f, r, s in zip(feats, ref, (4, 8, 16, 32)):
            assert f.shape[-2:] == (math.ceil(size[0] / s), math.ceil(size[1] / s))
            torch.testing.assert_close(f, r)


def test_timm_swin_through_the_same_wrapper():
    """A timm host with NHWC features and a fixed-size default (Swin-T) works with strict_img_size=False."""
    body = DenseBackbone("swin_tiny_patch4_window7_224", strict_img_size=False, img_size=(256, 320))
    feats = body(torch.randn(1, 3, 256, 320))
    assert [tuple(f.shape) for f in feats] == [(1, 96, 64, 80), (1, 192, 32, 40), (1, 384, 16, 20), (1, 768, 8, 10)]
    body = DenseBackbone("swin_tiny_patch4_window7_224", strict_img_size=False, frozen_stages=2, out_indices=(1, 2, 3))
    frozen = {n.split(".")[0] for n, p in body.features.named_parameters() if not p.requires_grad}
    assert frozen == {"patch_embed", "layers_0", "layers_1"}


# ---------------------------------------------------------------------------------- official dense checkpoints
CONFIG_T = ((2, 2, 6, 2), (1, 2, 4, 8))


def _official_dense_forward(sd, x, linear):
    """Official dense backbone (qhfan/MALA detect, qhfan/RALA GLTA): the
    classification forward up to the last stage, returning extra_norms[i](pre-downsample feature)."""
    depths, heads = CONFIG_T
    for i in (0, 3, 6, 9):
        x = _bn(_conv(x, sd, f"patch_embed.proj.{i}.", stride=2 if i in (0, 9) else 1), sd, f"patch_embed.proj.{i + 1}.")
        if i != 9:
            x = F.gelu(x)
    outs = []
    for s, (depth, nh) in enumerate(zip(depths, heads)):
        sin, cos = _rope_tables(sd[f"layers.{s}.RoPE.angle"], *x.shape[-2:])
        for j in range(depth):
            p = f"layers.{s}.blocks.{j}."
            x = x + _conv(x, sd, p + "pos.", groups=x.shape[1])
            x = x + sd[p + "gamma_1"] * _attention(_ln2d(x, sd, p + "norm1.norm."), sd, p + "attn.", nh,
                                                   linear if s < 2 else "softmax", sin, cos)
            y = F.gelu(_conv(_ln2d(x, sd, p + "norm2.norm."), sd, p + "ffn.fc1."))
            y = y + _conv(y, sd, p + "ffn.dwconv.", groups=y.shape[1])
            x = x + sd[p + "gamma_2"] * _conv(y, sd, p + "ffn.fc2.")
        outs.append(_ln2d(x, sd, f"extra_norms.{s}.norm."))
        if s < len(depths) - 1:
            x = _bn(_conv(x, sd, f"layers.{s}.downsample.reduction.", stride=2), sd, f"layers.{s}.downsample.norm.")
    return outs


def _official_dense_checkpoint(name, path, seed=0):
    """An mmdet-style official checkpoint: backbone keys under 'backbone.', no classifier, random
    extra_norms, neck/head keys beside it, and numpy values in 'meta' (as mmdet writes)."""
    g = torch.Generator().manual_seed(seed + 1)
    sd = {k: v for k, v in official_state_dict(name, seed).items() if not k.startswith(("proj.", "norm.", "head."))}
    for i, c in enumerate((64, 128, 256, 512)):
        sd[f"extra_norms.{i}.norm.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"extra_norms.{i}.norm.bias"] = 0.1 * torch.randn(c, generator=g)
    full = {f"backbone.{k}": v for k, v in sd.items()}
    full["neck.lateral_convs.0.conv.weight"] = torch.zeros(256, 64, 1, 1)
    full["rpn_head.rpn_conv.weight"] = torch.zeros(256, 256, 3, 3)
    torch.save({"state_dict": full, "meta": {"epoch": 12, "iter": np.int64(7330), "CLASSES": ("a", "b")}}, path)
    return sd


@pytest.mark.parametrize("name,linear", [("mavit_t", "mala"), ("ravlt_t", "rala")])
def test_official_dense_checkpoint_reproduces_official_outputs(tmp_path, name, linear):
    import linvision.adapters.mm  # noqa: F401
    from mmengine.registry import MODELS
    path = tmp_path / "maskrcnn_t_1x_12_epoch.pth"
    sd = _official_dense_checkpoint(name, path)
    backbone = MODELS.build(dict(type="LinVisionBackbone", model_name=name,
                                 init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")))
    backbone.init_weights()  # numpy values in meta are allow-listed plain data: no unsafe fallback
    backbone.eval()
    x = torch.randn(1, 3, 72, 104)
    with torch.no_grad():
        ours = backbone(x)
        ref = _official_dense_forward(sd, x, linear)
    assert isinstance(ours, tuple) and len(ours) == 4
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        assert ((a - b).norm() / b.norm()).item() < 1e-4


def test_dense_checkpoint_without_prefix_and_with_subset_of_outputs(tmp_path, caplog):
    path = tmp_path / "det.pth"
    sd = _official_dense_checkpoint("mavit_t", path)
    with caplog.at_level(logging.INFO, logger="linvision.adapters.dense"):
        body = DenseBackbone("mavit_t", out_indices=(1, 2, 3), checkpoint=path)  # 'backbone.' found by itself
    assert "prefix 'backbone.' stripped" in caplog.text
    assert "ignored" in caplog.text and "extra_norms.0.norm.weight" in caplog.text  # no stage-0 output here
    assert "MISSING" not in caplog.text and "UNEXPECTED" not in caplog.text
    torch.testing.assert_close(body.extra_norms[2].norm.weight, sd["extra_norms.2.norm.weight"])


# ---------------------------------------------------------------------------------- mm adapter
@pytest.fixture(scope="module")
def mm_models():
    import linvision.adapters.mm  # noqa: F401
    from mmengine.registry import MODELS
    return MODELS


def test_mm_import_needs_only_mmengine(mm_models):
    assert mm_models.get("LinVisionBackbone") is not None
    # Nothing in the test session imports them otherwise, so this checks the adapter's own imports.
    assert not [m for m in ("mmdet", "mmseg", "mmcv") if m in sys.modules]


def test_mm_backbone_outputs_and_channels(mm_models):
    backbone = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t", out_indices=(1, 2, 3)))
    from mmengine.model import BaseModule
    assert isinstance(backbone, BaseModule)
    outs = backbone(torch.randn(2, 3, 64, 96))
    assert isinstance(outs, tuple) and [tuple(o.shape) for o in outs] == [(2, 128, 8, 12), (2, 256, 4, 6), (2, 512, 2, 3)]
    assert backbone.channels == [128, 256, 512]  # what FPN(in_channels=...) needs
    keys = backbone.state_dict().keys()
    assert {f"extra_norms.{i}.norm.{p}" for i in (1, 2, 3) for p in ("weight", "bias")} <= set(keys)
    assert not any(k.startswith("extra_norms.0.") for k in keys)
    plain = mm_models.build(dict(type="LinVisionBackbone", model_name="ravlt_t", out_norms=False))
    assert not any(k.startswith("extra_norms.") for k in plain.state_dict())
    assert plain.channels == [64, 128, 256, 512]


def test_mm_with_cp_and_timm_pretrained_file(tmp_path, mm_models):
    """Activation checkpointing gives the same outputs; ``pretrained_file`` goes through timm's loader
    (official classification file) and marks the module initialised (init_weights keeps the weights)."""
    path = tmp_path / "MAViT_T.pth"
    sd = official_state_dict("mavit_t")
    torch.save({"model": sd}, path)
    plain = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t", pretrained_file=str(path)))
    plain.init_weights()
    torch.testing.assert_close(plain.features.model.stem[0].weight, sd["patch_embed.proj.0.weight"])
    cp = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t", pretrained_file=str(path), with_cp=True))
    assert all(s.grad_checkpointing for s in cp.features.model.stages)
    x = torch.randn(1, 3, 64, 64)
    plain.eval(), cp.eval()
    out, out_cp = plain(x), cp(x)
    for a, b in zip(out, out_cp):
        torch.testing.assert_close(a, b)
    sum(o.sum() for o in cp.train()(x)).backward()
    assert cp.features.model.stem[0].weight.grad is not None


def test_mm_frozen_stages_and_norm_eval(mm_models):
    backbone = mm_models.build(dict(type="LinVisionBackbone", model_name="linvit_t", frozen_stages=2, norm_eval=True))
    model = backbone.features.model
    frozen = [model.stem, model.stages[0], model.stages[1], backbone.extra_norms[0], backbone.extra_norms[1]]
    trainable = [model.stages[2], model.stages[3], backbone.extra_norms[2], backbone.extra_norms[3]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in trainable for p in m.parameters())
    backbone.train()
    assert not any(m.training for f in frozen for m in f.modules())
    assert model.stages[2].blocks[0].training and model.stages[3].training
    bns = [m for m in backbone.modules() if isinstance(m, _BatchNorm)]
    assert bns and not any(m.training for m in bns)  # norm_eval, including the unfrozen downsample BNs
    sum(o.mean() for o in backbone(torch.randn(2, 3, 64, 64))).backward()
    assert all(p.grad is None for m in frozen for p in m.parameters())
    assert all(p.grad is not None for p in model.stages[3].parameters())

    free = mm_models.build(dict(type="LinVisionBackbone", model_name="linvit_t", frozen_stages=0)).train()
    assert not free.features.model.stem.training and free.features.model.stages[0].training
    assert all(m.training for m in free.features.model.stages.modules() if isinstance(m, _BatchNorm))
    with pytest.raises(ValueError, match="frozen_stages"):
        mm_models.build(dict(type="LinVisionBackbone", model_name="linvit_t", frozen_stages=5))


def test_mm_init_cfg_loads_official_classification_checkpoint(tmp_path, mm_models, monkeypatch):
    import linvision.adapters.mm as mm
    messages = []
    monkeypatch.setattr(mm, "print_log", lambda msg, logger=None, level=logging.INFO: messages.append(msg))
    sd = official_state_dict("ravlt_t")
    path = tmp_path / "RAVLT_T.pth"
    torch.save({"model": sd}, path)
    backbone = mm_models.build(dict(type="LinVisionBackbone", model_name="ravlt_t",
                                    init_cfg=dict(type="Pretrained", checkpoint=str(path))))
    backbone.init_weights()
    model = backbone.features.model
    torch.testing.assert_close(model.stem[0].weight, sd["patch_embed.proj.0.weight"])
    torch.testing.assert_close(model.stages[2].downsample.conv.weight, sd["layers.1.downsample.reduction.weight"])
    report = "\n".join(messages)
    assert "loaded" in report and "extra_norms.0.norm.weight" in report  # missing output norms are named
    assert "conv_head.weight" in report  # so are the ignored classification keys
    # Output norms start at identity, as the official dense backbones.
    assert torch.equal(backbone.extra_norms[0].norm.weight, torch.ones(64))


def test_mm_init_cfg_with_prefix_loads_our_own_detector_checkpoint(tmp_path, mm_models):
    src = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t"))
    for p in src.extra_norms.parameters():
        torch.nn.init.normal_(p)
    full = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    full["neck.fpn_convs.0.conv.weight"] = torch.zeros(1)
    path = tmp_path / "epoch_12.pth"
    torch.save({"state_dict": full, "meta": {}}, path)
    dst = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t",
                               init_cfg=dict(type="Pretrained", checkpoint=str(path), prefix="backbone.")))
    dst.init_weights()
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    report = dst.load_pretrained(str(path), prefix="backbone.", strict=True)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(src.state_dict())


def test_mm_strict_and_shape_errors(tmp_path, mm_models):
    backbone = mm_models.build(dict(type="LinVisionBackbone", model_name="mavit_t"))
    cls = official_state_dict("mavit_t")
    with pytest.raises(KeyError, match="strict load failed"):
        backbone.load_checkpoint({"model": {k: v for k, v in cls.items() if "blocks.0.attn" not in k}}, strict=True)
    with pytest.raises(ValueError, match="shapes do not match"):
        backbone.load_checkpoint({"model": official_state_dict("mavit_s")})
    with pytest.raises(KeyError, match="no keys under prefix"):
        backbone.load_checkpoint({"state_dict": cls}, prefix="backbone.")


# ---------------------------------------------------------------------------------- configs and tools
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "mmdet" / "*.py")) + glob.glob(str(ROOT / "configs" / "mmseg" / "*.py")))


def test_config_set_is_complete():
    names = {Path(c).name for c in CONFIGS}
    for fam in ("mavit", "ravlt"):
        for s in "tsbl":
            assert f"mask-rcnn_{fam}-{s}_fpn_1x_coco.py" in names and f"retinanet_{fam}-{s}_fpn_1x_coco.py" in names
            assert f"fpn_{fam}-{s}_80k_ade20k-512x512.py" in names
        for s in "sbl":
            assert f"mask-rcnn_{fam}-{s}_fpn_ms-crop-3x_coco.py" in names
            assert f"cascade-mask-rcnn_{fam}-{s}_fpn_4conv1fc-giou_ms-crop-3x_coco.py" in names
            assert f"upernet_{fam}-{s}_160k_ade20k-512x512.py" in names


def test_configs_parse_and_backbones_build(mm_models):
    from mmengine.config import Config
    built = {}
    for path in CONFIGS:
        cfg = Config.fromfile(path)
        assert cfg.custom_imports.imports == ["linvision.adapters.mm"], path
        bb = cfg.model.backbone.to_dict()
        assert bb["type"] == "LinVisionBackbone" and "SyncBN" not in repr(bb), path
        key = repr(sorted((k, v) for k, v in bb.items() if k != "init_cfg"))
        if key not in built:
            built[key] = mm_models.build({k: v for k, v in bb.items() if k != "init_cfg"})
        channels = built[key].channels
        if cfg.default_scope == "mmdet":
            assert list(cfg.model.neck.in_channels) == channels, path
            assert bb["init_cfg"]["type"] == "Pretrained"
        else:
            assert cfg.default_scope == "mmseg"
            head = cfg.model.get("neck") or cfg.model.decode_head
            assert list(head.in_channels) == channels, path
            if "auxiliary_head" in cfg.model:
                assert cfg.model.auxiliary_head.in_channels == channels[cfg.model.auxiliary_head.in_index], path
    assert len(built) == 8  # {mavit, ravlt} x {t, s, b, l}


def test_config_optimizer_rules_apply_to_the_backbone(mm_models):
    """The configs' paramwise rules (no decay on 'norm' keys / norm layers) reach our parameter names;
    built with mmengine's own optimizer constructor (no mmdet needed)."""
    from mmengine.config import Config
    from mmengine.optim import build_optim_wrapper
    for name, expect_bn_decay in [("cascade-mask-rcnn_ravlt-s_fpn_4conv1fc-giou_ms-crop-3x_coco.py", 0.0),
                                  ("mask-rcnn_ravlt-s_fpn_1x_coco.py", 0.05)]:
        cfg = Config.fromfile(str(ROOT / "configs" / "mmdet" / name))
        cfg.optim_wrapper.type = "OptimWrapper"
        cfg.optim_wrapper.pop("loss_scale")
        model = torch.nn.Module()
        model.backbone = mm_models.build(dict(type="LinVisionBackbone", model_name="ravlt_t"))
        wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
        decay = {id(p): g["weight_decay"] for g in wrapper.optimizer.param_groups for p in g["params"]}
        bb = model.backbone
        assert decay[id(bb.extra_norms[0].norm.weight)] == 0.0
        assert decay[id(bb.features.model.stages[1].blocks[0].norm1.weight)] == 0.0
        assert decay[id(bb.features.model.stages[1].blocks[0].attn.qkvo.weight)] == 0.05
        assert decay[id(bb.features.model.stem[1].weight)] == expect_bn_decay  # stem BN: no 'norm' in its name


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_linvision_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(importlib.util.find_spec("mmdet") is not None, reason="mmdet is installed")
def test_train_dense_names_the_install_steps(capsys):
    tool = _tool("train_dense")
    rc = tool.main([str(ROOT / "configs" / "mmdet" / "mask-rcnn_ravlt-t_fpn_1x_coco.py"),
                    "--cfg-options", "model.backbone.frozen_stages=1"])
    err = capsys.readouterr().err
    assert rc == 1
    for needle in ("mmcv 2.1.0", "setuptools<81", "--no-build-isolation", "c++20", "mmdet==3.3.0"):
        assert needle in err, needle
    assert tool.main(["does/not/exist.py"]) == 2


def test_gpu_bench_script_parses():
    tool = _tool("gpu_det_bench")
    assert tool.MODELS == ("linvit_s", "resnet50", "swin_t")
