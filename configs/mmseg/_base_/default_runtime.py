# mmseg 1.x runtime (mmseg's configs/_base_/default_runtime.py) plus linvision's BN handling.
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

tta_model = dict(type='SegTTAModel')

# Plain BN in the backbone; BN → SyncBN only in distributed runs (the official backbones hard-code
# SyncBN); SyncBN heads are reverted to BN by the Runner in one process.
sync_bn = 'torch'
