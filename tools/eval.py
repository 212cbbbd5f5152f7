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
import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import timm
from timm.utils import ParseKwargs

from linvision.engine import InputError, evaluate_checkpoint, evaluate_many, write_results
from linvision.training.cli import (HelpFormatter, Refused, add_refused, check_refused, data_dir_from_args,
                                    import_device_modules)
from linvision.training.distributed import run_then_destroy_process_group

_BOOL = argparse.BooleanOptionalAction
_NAFLEX = "the NaFlex loader feeds ViT patch sequences; linvision backbones take images"
# timm validate.py flags that are parsed but refused.
REFUSED = [
    Refused(("--num-gpu",), "DataParallel over several GPUs is not used; run under torchrun --nproc_per_node=N", 1),
    Refused(("--test-pool",), "test-time pooling is not implemented for linvision models", False, "switch"),
    Refused(("--tf-preprocessing",), "TensorFlow preprocessing (needs tensorflow) is not supported", False, "switch"),
    Refused(("--torchscript",), "TorchScript is not supported for linvision models; use --torchcompile", False, "switch"),
    Refused(("--aot-autograd",), "functorch AOT autograd is superseded by --torchcompile", False, "switch"),
    Refused(("--fuser",), "a TorchScript fuser setting; TorchScript is not supported (use --torchcompile)", ""),
    Refused(("--model-dtype",), "evaluation runs fp32 weights; use --amp --amp-dtype bfloat16"),
    Refused(("--real-labels",), "ImageNet ReaL relabelling is not implemented", ""),
    Refused(("--valid-labels",), "ImageNet label subsets are not implemented", ""),
    Refused(("--metrics-avg",), "precision/recall/F1 averages are not computed (top-1/top-5/loss only)"),
    Refused(("--input-img-mode",), "the image mode follows --in-chans (1: L, otherwise RGB)"),
    Refused(("--naflex-loader",), _NAFLEX, False, "switch"),
    Refused(("--naflex-max-seq-len",), _NAFLEX, 576),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m", default=None,
                       help="timm model name (optionally with a weight tag), a file of names, or a wildcard "
                            "(default: from the checkpoint)")
    group.add_argument("--model-list", default=None,
                       help="several models: a file of names (one per line) or a comma-separated list")
    group.add_argument("--checkpoint", default=None,
                       help=".safetensors / .pth weights, a checkpoint manifest .json, or a directory of checkpoints")
    group.add_argument("--pretrained", action="store_true", help="use the model's registry (pretrained) weights")
    group.add_argument("--allow-model-mismatch", action="store_true", default=False,
                       help="load a linvision checkpoint written by another model name (refused by default)")
    group.add_argument("--use-ema", action=_BOOL, default=None,
                       help="EMA weights (default: the file given; for a container holding both, the model family's documented choice)")
    group.add_argument("--num-classes", type=int, default=None, help="default: the checkpoint's, else the data's")
    group.add_argument("--in-chans", type=int, default=None, help="input channels (default: the checkpoint's, else 3)")
    group.add_argument("--gp", default=None, metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--model-kwargs", nargs="*", default=None, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")
    group.add_argument("--reparam", action="store_true", default=False,
                       help="reparameterise the model for inference (timm.utils.reparameterize_model)")
    group.add_argument("--fast-norm", action="store_true", default=False, help="timm's fast (low-precision) norm layers")

    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", metavar="DIR", default=None, help="data directory (timm's positional form)")
    group.add_argument("--data-dir", "--data", dest="data_dir", default=None,
                       help="dataset root, split folder or .tar; or the positional DIR")
    group.add_argument("--dataset", default="", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--split", default="val", help="split under the data directory (also found as validation...)")
    group.add_argument("--num-samples", type=int, default=None, help="size of an iterable source's split")
    group.add_argument("--dataset-download", action="store_true", default=False, help="let torch/ sources download")
    group.add_argument("--class-map", default="", help="file of class names fixing the class index")
    group.add_argument("--input-key", default=None, help="image field of a hfds/wds/tfds source")
    group.add_argument("--target-key", default=None, help="label field of a hfds/wds/tfds source")
    group.add_argument("--dataset-trust-remote-code", action="store_true", default=False,
                       help="let a hfds source run its loading script")
    group.add_argument("--img-size", type=int, default=None, help="input size (default: the checkpoint's / model's)")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="full input size; overrides --img-size")
    group.add_argument("--use-train-size", action="store_true", default=False,
                       help="the model's train input size even where its cfg has a test size")
    group.add_argument("--crop-pct", type=float, default=None, help="centre-crop fraction")
    group.add_argument("--crop-mode", default=None, help="center, squash or border")
    group.add_argument("--crop-border-pixels", type=int, default=None, help="pixels cropped from each border")
    group.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    group.add_argument("--mean", type=float, nargs="+", default=None, help="normalisation mean per channel")
    group.add_argument("--std", type=float, nargs="+", default=None, help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, default=256, help="halved automatically on out-of-memory")
    group.add_argument("--workers", "-j", type=int, default=2, help="data-loading processes")
    group.add_argument("--prefetcher", action=_BOOL, default=None, help="default: on for CUDA")
    group.add_argument("--pin-mem", action=_BOOL, default=None, help="pinned host memory (default: on for CUDA)")

    group = parser.add_argument_group("run")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--device-modules", nargs="+", default=None, help="modules to import first (device backends)")
    group.add_argument("--amp", action=_BOOL, default=None, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"), help="autocast dtype")
    group.add_argument("--channels-last", action=_BOOL, default=False, help="NHWC memory format")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile with this backend (a mode name is taken as --torchcompile-mode)")
    group.add_argument("--torchcompile-mode", default=None, help="torch.compile mode")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--retry", action="store_true", default=False,
                       help="retry with a smaller batch on out-of-memory (always done)")
    group.add_argument("--seed", type=int, default=42, help="random seed")
    group.add_argument("--log-freq", type=int, default=10, help="timm's per-batch log interval; progress is a tqdm bar")
    group.add_argument("--progress", action=_BOOL, default=True, help="tqdm bar")
    group.add_argument("--results-file", default="", help="write the results here (one row per model/checkpoint)")
    group.add_argument("--results-format", default="csv", choices=("csv", "json"), help="--results-file format")
    add_refused(parser, REFUSED, "timm validate.py flags that linvision refuses (the reason is the help)")
    return parser


def _names(spec: str) -> List[str]:
    """A file of names (one per line, ``#`` comments) or a comma-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        return [line for line in lines if line]
    return [n.strip() for n in spec.split(",") if n.strip()]


def _checkpoints_in(directory: Path) -> List[str]:
    found = [p for pattern in ("*.safetensors", "*.pth", "*.pth.tar") for p in directory.glob(pattern)
             if not p.name.endswith((".ema.safetensors", ".state.pth", "_state.pth"))]
    seen, files = set(), []
    for p in sorted(set(found)):
        inode = (p.stat().st_dev, p.stat().st_ino)  # model_best.safetensors is a hard link to best.safetensors
        if inode not in seen:
            seen.add(inode)
            files.append(str(p))
    return files


def bulk_jobs(args: argparse.Namespace) -> Optional[List[Tuple[Optional[str], Optional[str]]]]:
    """The ``(model, checkpoint)`` list of a bulk run, or ``None`` for a single evaluation."""
    if args.checkpoint and Path(args.checkpoint).is_dir():
        files = _checkpoints_in(Path(args.checkpoint))
        if not files:
            raise InputError(f"--checkpoint {args.checkpoint}: no *.safetensors / *.pth / *.pth.tar files")
        return [(args.model, f) for f in files]
    names = None
    if args.model_list:
        names = _names(args.model_list)
    elif args.model and Path(args.model).is_file():
        names = _names(args.model)
    elif args.model and any(c in args.model for c in "*?[") and not timm.is_model(args.model):
        names = timm.list_models(args.model, pretrained=True) or [
            n for n in timm.list_models() if fnmatch.fnmatch(n, args.model)]
        args.pretrained = True  # as timm's validate.py: a wildcard means pretrained weights
    if names is None:
        return None
    if not names:
        raise InputError(f"no models in {args.model_list or args.model}")
    return [(name, args.checkpoint) for name in names]


def main(argv: Optional[List[str]] = None):
    parser = build_parser()
    args = parser.parse_args(argv)
    check_refused(parser, args, REFUSED)
    data_dir_from_args(parser, args)
    import_device_modules(args.device_modules)
    try:
        jobs = bulk_jobs(args)
        if jobs is None:
            result = evaluate_checkpoint(args)
            rows = None
        else:
            rows = evaluate_many(args, jobs)
            result = rows
        if args.results_file:
            if rows is None:
                rows = [dict(result, top1_err=round(100 - result["top1"], 4),
                             top5_err=round(100 - result["top5"], 4), checkpoint=result["weights"])]
            path = write_results(args.results_file, rows, args.results_format)
            print(f"results: {path} ({len(rows)} row{'s' if len(rows) != 1 else ''})")
        if jobs is not None:
            print(f"--result\n{json.dumps(result, indent=2, default=str)}")
        return result
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_then_destroy_process_group(main)
