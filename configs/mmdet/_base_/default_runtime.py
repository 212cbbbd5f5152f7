# mmdet 3.x runtime (mmdet's configs/_base_/default_runtime.py) plus linvision's BN handling.
default_scope = 'mmdet'

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=50, by_epoch=True)

log_level = 'INFO'
load_from = None
resume = False

# The backbone uses plain BatchNorm (safe in one process). The official dense backbones hard-code
# SyncBatchNorm; mmengine's Runner converts every BN to SyncBN only in
# distributed runs when sync_bn is set, and reverts SyncBN heads to BN in single-process runs.
sync_bn = 'torch'
