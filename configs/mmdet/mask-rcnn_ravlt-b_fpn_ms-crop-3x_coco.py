# RAVLT-B (RALA) Mask R-CNN 3x on COCO, as the official config:
# AdamW lr 1e-4, wd 0.05, 36 epochs (steps 27, 33), 2 images per GPU, multi-scale + crop augmentation.
# Official result: AP^b 52.7 / AP^m 46.4 (maskrcnn_b_3x_36_epoch.pth).
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_b',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_B.pth')),
    neck=dict(in_channels=[96, 192, 384, 512]))
optim_wrapper = dict(optimizer=dict(lr=1e-4))
