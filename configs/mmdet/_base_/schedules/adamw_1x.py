# 1x schedule of the official MALA/RALA Mask R-CNN configs:
# AdamW (the per-model config sets lr: MAViT 4e-4, RAVLT 1e-4), wd 0.05, no decay on norms and
# position tables, 12 epochs, lr x0.1 at epochs 8 and 11, 500-iteration linear warmup from 1e-3,
# 2 images per GPU (the GPU count is not stated upstream; mmdet's convention is 8 → batch 16).
# Mixed precision as upstream (fp16=dict()): mmcv's RoIAlign has no bf16 kernel, so fp16.
max_epochs = 12
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True, milestones=[8, 11], gamma=0.1)
]

optim_wrapper = dict(
    type='AmpOptimWrapper',
    loss_scale='dynamic',
    optimizer=dict(type='AdamW', lr=0.0004, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'norm': dict(decay_mult=0.),
            'absolute_pos_embed': dict(decay_mult=0.),
            'relative_position_bias_table': dict(decay_mult=0.),
        }))

# lr above is for the authors' total batch; enable to scale it linearly to yours.
auto_scale_lr = dict(enable=False, base_batch_size=16)
