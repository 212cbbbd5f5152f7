# MAViT-S (MALA) UPerNet on ADE20K, as the official config:
# AdamW lr 6e-5, wd 0.01, 160k iterations (warmup 1500, poly 1.0), 2 images per GPU, 512x512 crops.
# Official result: in the MALA paper (arXiv 2507.00698), not in its repository.
_base_ = [
    '_base_/models/upernet_linvision.py', '_base_/datasets/ade20k.py',
    '_base_/schedules/adamw_160k.py', '_base_/default_runtime.py'
]
# MAViT classification weights: https://huggingface.co/aldjalkdf/MAViT (file names
# undocumented); download one and put it here, or set init_cfg=None to train from scratch.
model = dict(
    backbone=dict(
        model_name='mavit_s',
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/MAViT_S.pth')),
    decode_head=dict(in_channels=[64, 128, 320, 512]),
    auxiliary_head=dict(in_channels=320))
