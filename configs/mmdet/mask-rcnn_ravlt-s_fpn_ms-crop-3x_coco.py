# RAVLT-S (RALA) Mask R-CNN 3x on COCO, as the official config:
# AdamW lr 1e-4, wd 0.05, 36 epochs (steps 27, 33), 2 images per GPU, multi-scale + crop augmentation.
# Official result: AP^b 51.4 / AP^m 45.5 (maskrcnn_s_3x_36_epoch.pth).
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_s',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_S.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(optimizer=dict(lr=1e-4))
