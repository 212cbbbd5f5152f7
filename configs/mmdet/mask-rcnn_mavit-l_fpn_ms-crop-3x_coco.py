# MAViT-L (MALA) Mask R-CNN 3x on COCO, as the official config:
# AdamW lr 2e-4, wd 0.05, 36 epochs (steps 27, 33), 1 image per GPU, multi-scale + crop augmentation.
# Official result: in the MALA paper (arXiv 2507.00698), not in its repository.
_base_ = [
    '_base_/models/mask-rcnn_linvision_fpn.py', '_base_/datasets/coco_instance_ms-crop.py',
    '_base_/schedules/adamw_3x.py', '_base_/default_runtime.py'
]
# MAViT classification weights: https://huggingface.co/aldjalkdf/MAViT (file names
# undocumented); download one and put it here, or set init_cfg=None to train from scratch.
model = dict(
    backbone=dict(
        model_name='mavit_l',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/MAViT_L.pth')),
    neck=dict(in_channels=[96, 192, 448, 640]))
optim_wrapper = dict(optimizer=dict(lr=2e-4))
train_dataloader = dict(batch_size=1)
