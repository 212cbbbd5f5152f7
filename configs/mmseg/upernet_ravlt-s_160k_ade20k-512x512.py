# RAVLT-S (RALA) UPerNet on ADE20K, as the official config:
# AdamW lr 6e-5, wd 0.01, 160k iterations (warmup 1500, poly 1.0), 2 images per GPU, 512x512 crops.
# Official result: mIoU 50.7 (uper_s_2x.pth).
_base_ = [
    '_base_/models/upernet_linvision.py', '_base_/datasets/ade20k.py',
    '_base_/schedules/adamw_160k.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_s',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_S.pth')),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
