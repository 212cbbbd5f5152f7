# RAVLT-S (RALA) Mask R-CNN 1x on COCO, as the official config:
# AdamW lr 1e-4, wd 0.05, 12 epochs (steps 8, 11), 2 images per GPU, single scale (1333, 800).
# Official result: AP^b 49.8 / AP^m 44.6 (maskrcnn_s_1x_12_epoch.pth).
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance.py',
    '_base_/schedules/adamw_1x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_s',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_S.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(optimizer=dict(lr=1e-4))
