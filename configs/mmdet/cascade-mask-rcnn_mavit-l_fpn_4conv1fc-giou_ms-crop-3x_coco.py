# MAViT-L (MALA) Cascade Mask R-CNN 3x on COCO, as the official config:
# 4conv1fc GIoU box heads, AdamW lr 2e-4, wd 0.05 (none on norm layers), 36 epochs (steps 27, 33),
# 1 image per GPU, multi-scale + crop augmentation.
# Official result: in the MALA paper (arXiv 2507.00698), not in its repository.
_base_ = [
    '_base_/models/cascade-mask-rcnn_linvision_fpn_4conv1fc-giou.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
# MAViT classification weights: https://huggingface.co/aldjalkdf/MAViT (file names
# undocumented); download one and put it here, or set init_cfg=None to train from scratch.
model = dict(
    backbone=dict(
        model_name='mavit_l',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/MAViT_L.pth')),
    neck=dict(in_channels=[96, 192, 448, 640]))
optim_wrapper = dict(
    optimizer=dict(lr=2e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0, custom_keys={'rpe_table': dict(decay_mult=0.)}))
train_dataloader = dict(batch_size=1)
