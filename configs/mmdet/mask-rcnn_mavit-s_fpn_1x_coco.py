# MAViT-S (MALA) Mask R-CNN 1x on COCO, as the official config:
# AdamW lr 4e-4, wd 0.05, 12 epochs (steps 8, 11), 2 images per GPU, single scale (1333, 800).
# Official result: in the MALA paper (arXiv 2507.00698), not in its repository.
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance.py',
    '_base_/schedules/adamw_1x.py', '_base_/default_runtime.py'
]
# MAViT classification weights: https://huggingface.co/aldjalkdf/MAViT (file names
# undocumented); download one and put it here, or set init_cfg=None to train from scratch.
model = dict(
    backbone=dict(
        model_name='mavit_s',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/MAViT_S.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
optim_wrapper = dict(optimizer=dict(lr=4e-4))
