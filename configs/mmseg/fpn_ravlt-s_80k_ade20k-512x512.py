# RAVLT-S (RALA) Semantic FPN on ADE20K, as the official config:
# AdamW lr 1e-4, wd 1e-4, 80k iterations, poly (0.9), 2 images per GPU, 512x512 crops.
# Official result: mIoU 49.5 (fpn_s_1x.pth).
_base_ = [
    '_base_/models/fpn_linvision.py', '_base_/datasets/ade20k.py',
    '_base_/schedules/adamw_80k.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_s',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_S.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
