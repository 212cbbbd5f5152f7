# Semantic FPN (mmseg 1.x configs/_base_/models/fpn_r50.py) on a linvision backbone, as the official
# MALA/RALA configs: FPN 256 channels, 4 levels, FPNHead 128 channels.
# The per-model config sets backbone.model_name, backbone.init_cfg and neck.in_channels.
# SyncBN in the head is reverted to BN by mmengine's Runner in single-process runs.
custom_imports = dict(imports=['linvision.adapters.mm'], allow_failed_imports=False)

norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='LinVisionBackbone',
        model_name='mavit_t',
        out_indices=(0, 1, 2, 3),
        out_norms=True,  # official per-stage LayerNorm2d (extra_norms)
        frozen_stages=-1,
        norm_eval=False,  # official norm_eval=True had no effect with SyncBN (its BNs trained)
    ),
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 256, 512],
        out_channels=256,
        num_outs=4),
    decode_head=dict(
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
