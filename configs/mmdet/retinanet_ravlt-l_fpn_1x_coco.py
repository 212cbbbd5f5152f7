# RAVLT-L (RALA) RetinaNet 1x on COCO, as the official config:
# AdamW lr 1e-4, wd 1e-4, 12 epochs (steps 8, 11), 2 images per GPU, single scale (1333, 800).
# Official result: AP^b 50.9 (retinanet_l_1x_12_epoch.pth).
_base_ = [
    '_base_/models/retinanet_linvision_fpn.py', '_base_/datasets/coco_detection.py',
    '_base_/schedules/adamw_1x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_l',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_L.pth')),
    neck=dict(in_channels=[96, 192, 448, 640]))
optim_wrapper = dict(
    _delete_=True,
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4))
