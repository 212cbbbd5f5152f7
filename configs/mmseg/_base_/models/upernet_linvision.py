# UPerNet (mmseg 1.x configs/_base_/models/upernet_swin.py) on a linvision backbone, as the official
# MALA/RALA configs: UPerHead 512 channels, PPM (1, 2, 3, 6), auxiliary
# FCNHead on stage 2 with weight 0.4. SyncBN is reverted to BN by the Runner in one process.
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
        model_name='mavit_s',
        out_indices=(0, 1, 2, 3),
        out_norms=True,
        frozen_stages=-1,
        norm_eval=False,  # official norm_eval=True had no effect with SyncBN (its BNs trained)
    ),
    decode_head=dict(
        type='UPerHead',
        in_channels=[64, 128, 320, 512],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=320,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
