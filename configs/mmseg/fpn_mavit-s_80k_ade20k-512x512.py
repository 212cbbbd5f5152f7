# MAViT-S (MALA) Semantic FPN on ADE20K, as the official config:
# AdamW lr 1e-4, wd 1e-4, 80k iterations, poly (0.9), 2 images per GPU, 512x512 crops.
# Official result: in the MALA paper (arXiv 2507.00698), not in its repository.
_base_ = [
    '_base_/models/fpn_linvision.py', '_base_/datasets/ade20k.py',
    '_base_/schedules/adamw_80k.py', '_base_/default_runtime.py'
]
# MAViT classification weights: https://huggingface.co/aldjalkdf/MAViT (file names
# undocumented); download one and put it here, or set init_cfg=None to train from scratch.
model = dict(
    backbone=dict(
        model_name='mavit_s',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/MAViT_S.pth')),
    neck=dict(in_channels=[64, 128, 320, 512]))
