# RAVLT-B (RALA) Cascade Mask R-CNN 3x on COCO, as the official config:
# 4conv1fc GIoU box heads, AdamW lr 1e-4, wd 0.05 (none on norm layers), 36 epochs (steps 27, 33),
# 2 images per GPU, multi-scale + crop augmentation.
# Official result: AP^b 55.3 / AP^m 47.7 (Casmaskrcnn_b_3x_36_epoch.pth).
_base_ = [
    '_base_/models/cascade-mask-rcnn_linvision_fpn_4conv1fc-giou.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
model = dict(
    backbone=dict(
        model_name='ravlt_b',
        init_cfg=dict(type='Pretrained', checkpoint='https://huggingface.co/aldjalkdf/RAVLT/resolve/main/RAVLT_B.pth')),
    neck=dict(in_channels=[96, 192, 384, 512]))
optim_wrapper = dict(
    optimizer=dict(lr=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'rpe_table': dict(decay_mult=0.)}))
