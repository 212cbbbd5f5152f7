# RAVLT-B (RALA) UPerNet on ADE20K, as the official config:
# AdamW lr 6e-5, wd 0.01, 160k iterations (warmup 1500, poly 1.0), 2 images per GPU, 512x512 crops.
# Official result: mIoU 52.5 (uper_b_2x.pth).
_base_ = [
    '_base_/models/upernet_linvision.py', '_base_/datasets/ade20k.py',
    '_base_/schedules/adamw_160k.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_b',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_B.pth')),
    decode_head=dict(in_channels=[96, 192, 384, 512]),
    auxiliary_head=dict(in_channels=384))
