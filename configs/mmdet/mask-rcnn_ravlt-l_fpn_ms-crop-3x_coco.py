# RAVLT-L (RALA) Mask R-CNN 3x on COCO, as the official config:
# AdamW lr 1e-4, wd 0.05, 36 epochs (steps 27, 33), 1 image per GPU, multi-scale + crop augmentation.
# Official result: AP^b 53.6 / AP^m 47.3 (maskrcnn_l_3x_36_epoch.pth).
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_l',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_L.pth')),
    neck=dict(in_channels=[96, 192, 448, 640]))
optim_wrapper = dict(optimizer=dict(lr=1e-4))
train_dataloader = dict(batch_size=1)
