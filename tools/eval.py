#!/usr/bin/env python3
"""Evaluate a checkpoint, registry weights or --pretrained on a folder, tar or timm source: top-1, top-5, images/s.

A ``.safetensors`` file written by ``tools/train.py`` carries its model name, classes and
preprocessing, so ``--checkpoint`` and ``--data-dir`` are enough; flags override. ``--use-ema``
takes the EMA weights (``X.ema.safetensors`` beside a linvision checkpoint, the ``model_ema`` /
``state_dict_ema`` entry of a ``.pth``). Every file is read without running code from it and
checked against the manifest beside it, if any. Other checkpoints (``.pth``, official releases, converted
by the model family's filter) need ``--model`` (and ``--num-classes`` etc. as trained).
``--data-dir`` is a root holding ``<split>/<class>/*`` (or ``<split>.tar``), the split folder or
tar itself, or the root of a ``--dataset`` source. Under torchrun every process evaluates a share.
A CUDA out-of-memory error halves the batch size and retries.

Several models or checkpoints at once (timm's ``validate.py`` bulk mode), one row each in
``--results-file`` (CSV, or JSON with ``--results-format json``), best top-1 first: ``--model`` naming
a text file of model names (one per line; ``--model-list`` takes a file or a comma-separated list),
a wildcard (``'linvit_*'``: registered names with pretrained weights), or ``--checkpoint`` naming a
directory (every ``*.safetensors``, ``*.pth``, ``*.pth.tar`` in it). Command lines of timm's
``validate.py`` are accepted; its flags that do not apply stop with the reason.

Examples::

    python tools/eval.py --checkpoint output/demo/best.safetensors --data-dir .cache/mnist5k
    python tools/eval.py --checkpoint output/mavit_t/last.safetensors --use-ema --data-dir /data/imagenet
    python tools/eval.py --model mavit_s --pretrained --data-dir /data/imagenet/val
    torchrun --nproc_per_node=8 tools/eval.py --model mavit_s --checkpoint MAViT_S.pth --data-dir /data/imagenet
    python tools/eval.py /data/imagenet --checkpoint output/mavit_t/checkpoints --results-file results.csv
    python tools/eval.py /data/imagenet --model-list linvit_t,linvit_s --pretrained --results-file results.csv
"""
from linvision.training.cli import build_eval_parser as build_parser  # noqa: F401  (for scripts that load this file)
from linvision.training.cli import eval_main as main
from linvision.training.distributed import run_then_destroy_process_group

if __name__ == "__main__":
    run_then_destroy_process_group(main)
