#!/usr/bin/env python3
"""Train a timm/linvision model on ImageNet-style data (one process, or many through torchrun).

Data: an ImageFolder tree (``<data-dir>/train/<class>/*``, ``<data-dir>/val/<class>/*``), one tar per
split (``<data-dir>/train.tar``), or a timm source with ``--dataset`` (``wds/...``, ``hfds/...``,
``torch/cifar10``...). Flags follow timm's train.py. ``-c/--config FILE`` loads YAML defaults (keys
are flag names), ``--set KEY=VALUE`` overrides single keys, explicit flags override both; the
resolved config is saved as ``<output>/config.yaml``. The loop lives in :mod:`linvision.engine`;
this script only parses arguments. See docs/training.md.

Examples::

    python tools/train.py -c configs/demo.yaml --data-dir .cache/mnist5k --output output/demo
    torchrun --nproc_per_node=8 tools/train.py -c configs/imagenet/mavit_t.yaml --data-dir /data/imagenet \\
        --output output/mavit_t --resume auto
    python tools/train.py -c configs/imagenet/linvit_t.yaml --data-dir /data/imagenet --set epochs=100 --set batch_size=64
"""
import argparse
import sys
from typing import List, Optional

from timm.utils import ParseKwargs

from linvision.engine import InputError, train
from linvision.training.cli import (HelpFormatter, Refused, add_refused, check_refused, data_dir_from_args,
                                    import_device_modules, run_dir)
from linvision.training.config import config_dict, parse_args_with_config
from linvision.training.distributed import run_then_destroy_process_group

_BOOL = argparse.BooleanOptionalAction

_MULTIRES = "multi-resolution / variable-batch schedules are not supported: the resumable sampler fixes one batch size"
_NAFLEX = "the NaFlex loader feeds ViT patch sequences; linvision backbones take images"
_KD = "knowledge distillation is not implemented in linvision's training loop"
_AUGMIX = ("AugMix split batches (JSD loss, split BatchNorm) are not supported by the per-sample-seeded "
           "resumable loader; use --aa augmix-... without splits")
# timm train.py flags that are parsed but refused (see docs/training.md for the reasons in full).
REFUSED = [
    Refused(("--torchscript",), "TorchScript is not supported for linvision models; use --torchcompile", False, "switch"),
    Refused(("--fuser",), "a TorchScript fuser setting; TorchScript is not supported (use --torchcompile)", ""),
    Refused(("--model-dtype",), "training keeps fp32 weights (fp32 attention state); use --amp --amp-dtype bfloat16"),
    Refused(("--aug-splits",), _AUGMIX, 0),
    Refused(("--jsd-loss",), _AUGMIX, False, "switch"),
    Refused(("--resplit",), _AUGMIX, False, "switch"),
    Refused(("--split-bn",), _AUGMIX, False, "switch"),
    Refused(("--model-ema-force-cpu",), "the EMA lives on the training device (it is evaluated and checkpointed "
            "with the model)", False, "switch"),
    Refused(("--worker-seeding",), "augmentations are seeded per sample (the bit-exact resume guarantee); only "
            "'all' applies", "all"),
    Refused(("--save-images",), "not implemented (a debugging aid of timm's loop)", False, "switch"),
    Refused(("--tta",), "test-time augmentation of the validation pass is not implemented", 0),
    Refused(("--epoch-repeats",), "epoch length is one pass over the data (the resumable sampler's unit)", 0.0),
    Refused(("--input-img-mode",), "the image mode follows --in-chans (1: L, otherwise RGB)"),
    Refused(("--train-img-sizes",), _MULTIRES, None, "values"),
    Refused(("--train-batch-sizes",), _MULTIRES, None, "values"),
    Refused(("--train-size-probs",), _MULTIRES, None, "values"),
    Refused(("--train-size-schedule",), _MULTIRES, "constant"),
    Refused(("--train-size-schedule-spread",), _MULTIRES, 0.65),
    Refused(("--train-size-random-mix",), _MULTIRES, 0.1),
    Refused(("--train-batches-per-epoch", "--train-steps-per-epoch"), _MULTIRES),
    Refused(("--variable-batch-loss-scale",), _MULTIRES, "none"),
    Refused(("--naflex-loader",), _NAFLEX, False, "switch"),
    Refused(("--naflex-train-seq-lens",), _NAFLEX, [128, 256, 576, 784, 1024], "values"),
    Refused(("--naflex-max-seq-len",), _NAFLEX, 576),
    Refused(("--naflex-patch-sizes",), _NAFLEX, None, "values"),
    Refused(("--naflex-patch-size-probs",), _NAFLEX, None, "values"),
    Refused(("--naflex-loss-scale",), _NAFLEX, "linear"),
    Refused(("--naflex-patchify-channels-first",), _NAFLEX, False, "switch"),
    Refused(("--kd-model-name",), _KD),
    Refused(("--kd-distill-type",), _KD, "logit"),
    Refused(("--kd-loss-type",), _KD, "kl"),
    Refused(("--distill-loss-weight",), _KD),
    Refused(("--task-loss-weight",), _KD),
    Refused(("--kd-temperature",), _KD, 4.0),
    Refused(("--kd-student-feature-dim",), _KD),
    Refused(("--kd-teacher-feature-dim",), _KD),
    Refused(("--kd-token-distill-type",), _KD, "soft"),
]


def _floats(n):
    return dict(type=float, nargs=n, metavar="F")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag defaults (timm's args.yaml too)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (YAML value); repeatable")

    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", metavar="DIR", default=None, help="data directory (timm's positional form)")
    group.add_argument("--data-dir", "--data", dest="data_dir", default=None,
                       help="dataset root (ImageFolder splits, <split>.tar, or a source root); or the positional DIR")
    group.add_argument("--dataset", default="", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--train-split", default="train")
    group.add_argument("--val-split", default="val", help="also found as validation/valid/eval/test")
    group.add_argument("--dataset-download", action=_BOOL, default=False, help="let torch/ sources download")
    group.add_argument("--train-num-samples", type=int, default=None, help="epoch size of an iterable source")
    group.add_argument("--val-num-samples", type=int, default=None)
    group.add_argument("--class-map", default="", help="file of class names (one per line) fixing the class index")
    group.add_argument("--input-key", default=None, help="image field of a hfds/wds/tfds source")
    group.add_argument("--target-key", default=None, help="label field of a hfds/wds/tfds source")
    group.add_argument("--dataset-trust-remote-code", action="store_true", default=False,
                       help="let a hfds source run its loading script")
    group.add_argument("--img-size", type=int, default=None, help="input size (default: the model's)")
    group.add_argument("--input-size", type=int, nargs=3, default=None, metavar=("C", "H", "W"),
                       help="full input size; overrides --img-size (C also sets --in-chans when unset)")
    group.add_argument("--crop-pct", type=float, default=None, help="eval centre-crop fraction")
    group.add_argument("--interpolation", default=None, help="resize interpolation (default: the model's)")
    group.add_argument("--train-interpolation", default=None, help="random-resized-crop interpolation (default: --interpolation)")
    group.add_argument("--mean", **_floats("+"), default=None, help="normalisation mean per channel")
    group.add_argument("--std", **_floats("+"), default=None, help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, default=128, help="per process")
    group.add_argument("--val-batch-size", "-vb", "--validation-batch-size", dest="val_batch_size", type=int,
                       default=None, help="default: 2x --batch-size")
    group.add_argument("--workers", "-j", type=int, default=2, help="data-loading processes per rank (0: in the main one)")
    group.add_argument("--prefetcher", action=_BOOL, default=None,
                       help="uint8 batches normalised/erased on the device (default: on for CUDA)")
    group.add_argument("--pin-mem", action=_BOOL, default=None, help="pinned host memory (default: on for CUDA)")
    group.add_argument("--use-multi-epochs-loader", action="store_true", default=False,
                       help="keep loader workers across epochs (always done: persistent workers)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="linvit_t", help="timm model name")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--pretrained-path", default=None,
                       help="file to use as the pretrained weights (implies --pretrained; a different head is dropped)")
    group.add_argument("--initial-checkpoint", default="", help="weights to start from (strict load, no optimizer state)")
    group.add_argument("--allow-model-mismatch", action="store_true", default=False,
                       help="load a linvision checkpoint written by another model name (refused by default)")
    group.add_argument("--num-classes", type=int, default=None, help="default: number of classes in the data")
    group.add_argument("--in-chans", type=int, default=None, help="input channels; 1 loads images as greyscale "
                       "(default: --input-size's C, else 3)")
    group.add_argument("--gp", default=None, metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--drop", type=float, default=None, help="dropout before the classifier")
    group.add_argument("--drop-path", type=float, default=None, help="stochastic depth rate (default: the model's)")
    group.add_argument("--drop-connect", type=float, default=None, help="timm's old name of --drop-path")
    group.add_argument("--drop-block", type=float, default=None, help="DropBlock rate (models that take it)")
    group.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum (models that take it)")
    group.add_argument("--bn-eps", type=float, default=None, help="BatchNorm epsilon (models that take it)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")
    group.add_argument("--head-init-scale", type=float, default=None, help="multiply the classifier weights by this")
    group.add_argument("--head-init-bias", type=float, default=None, help="fill the classifier bias with this")
    group.add_argument("--grad-checkpointing", action=_BOOL, default=False, help="activation checkpointing per block")
    group.add_argument("--fast-norm", action="store_true", default=False, help="timm's fast (low-precision) norm layers")
    group.add_argument("--channels-last", action=_BOOL, default=False, help="NHWC memory format")
    group.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                       help="torch.compile the model with this backend (a mode name such as max-autotune is "
                            "taken as --torchcompile-mode)")
    group.add_argument("--torchcompile-mode", default=None, help="torch.compile mode (default, reduce-overhead, max-autotune)")
    group.add_argument("--sync-bn", action=_BOOL, default=False, help="SyncBatchNorm across ranks")
    group.add_argument("--dist-bn", default="reduce", choices=("reduce", "broadcast", ""),
                       help="sync BatchNorm statistics at epoch end (without --sync-bn)")
    group.add_argument("--fsdp", action=_BOOL, default=False,
                       help="shard parameters, gradients and optimizer state with FSDP2 (distributed runs)")
    group.add_argument("--model-ema", action=_BOOL, default=False, help="keep (and evaluate) an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float, default=0.9998)
    group.add_argument("--model-ema-decay-base-size", type=int, default=None,
                       help="raise the decay to the power global_batch/SIZE (the MAViT/RAVLT rule)")
    group.add_argument("--model-ema-warmup", action=_BOOL, default=False, help="ModelEmaV3 decay warmup")

    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="train on resized + centre-cropped images")
    group.add_argument("--train-crop-mode", default=None, help="random-resized-crop variant (timm's create_transform)")
    group.add_argument("--scale", **_floats(2), default=[0.08, 1.0], help="random-resized-crop area range")
    group.add_argument("--ratio", **_floats(2), default=[3 / 4, 4 / 3], help="random-resized-crop aspect range")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    group.add_argument("--vflip", type=float, default=0.0, help="vertical flip probability")
    group.add_argument("--color-jitter", type=float, default=0.4, help="ignored by timm when --aa is set")
    group.add_argument("--color-jitter-prob", type=float, default=None, help="probability of applying colour jitter")
    group.add_argument("--grayscale-prob", type=float, default=None, help="probability of a greyscale image")
    group.add_argument("--gaussian-blur-prob", type=float, default=None, help="probability of a Gaussian blur")
    group.add_argument("--aa", default=None, help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)")
    group.add_argument("--reprob", type=float, default=0.0, help="random erasing probability")
    group.add_argument("--remode", default="pixel", help="random erasing fill: const, rand, pixel")
    group.add_argument("--recount", type=int, default=1, help="random erasing count")
    group.add_argument("--aug-repeats", type=float, default=0, help="repeated augmentation (RepeatAugSampler), e.g. 3")
    group.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", **_floats(2), default=None, help="cutmix box ratio range (overrides alpha)")
    group.add_argument("--mixup-prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    group.add_argument("--mixup-switch-prob", type=float, default=0.5, help="probability of cutmix when both are on")
    group.add_argument("--mixup-mode", default="batch", help="batch, pair or elem")
    group.add_argument("--mixup-off-epoch", type=int, default=0, help="turn mixup off from this epoch (0: never)")
    group.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    group.add_argument("--bce-loss", action=_BOOL, default=False, help="binary cross-entropy instead of softmax CE")
    group.add_argument("--bce-sum", action="store_true", default=False, help="BCE summed over classes")
    group.add_argument("--bce-target-thresh", type=float, default=None, help="binarise BCE targets at this value")
    group.add_argument("--bce-pos-weight", type=float, default=None, help="BCE positive-class weight")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, default=300, help="epochs to train")
    group.add_argument("--start-epoch", type=int, default=None,
                       help="start at this epoch (overrides the resumed epoch; the schedule is set to it)")
    group.add_argument("--opt", default="adamw", help="timm optimizer name")
    group.add_argument("--opt-eps", type=float, default=None, help="optimizer epsilon")
    group.add_argument("--opt-betas", **_floats("+"), default=None, help="optimizer betas")
    group.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs, help="extra optimizer kwargs, k=v ...")
    group.add_argument("--lr", type=float, default=1e-3, help="learning rate (null in a config: from --lr-base)")
    group.add_argument("--lr-base", type=float, default=5e-4, help="lr for a global batch of --lr-base-size")
    group.add_argument("--lr-base-size", type=int, default=512, help="global batch that --lr-base is for")
    group.add_argument("--lr-base-scale", default="linear", choices=("linear", "sqrt", ""),
                       help="'' picks as timm does: sqrt for ada*/lamb optimizers, else linear")
    group.add_argument("--weight-decay", type=float, default=0.05, help="weight decay (not on 1-D parameters)")
    group.add_argument("--momentum", type=float, default=0.9, help="for SGD-style optimizers")
    group.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (group_matcher)")
    group.add_argument("--layer-decay-min-scale", type=float, default=0.0, help="lowest layer-decay lr scale")
    group.add_argument("--layer-decay-no-opt-scale", type=float, default=None,
                       help="freeze layers whose layer-decay scale is below this")
    group.add_argument("--clip-grad", type=float, default=None, help="gradient clipping threshold")
    group.add_argument("--clip-mode", default="norm", help="norm, value or agc")
    group.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer update")
    group.add_argument("--sched", default="cosine", help="timm scheduler name (none: constant lr; plateau is refused)")
    group.add_argument("--sched-on-updates", action=_BOOL, default=True,
                       help="step the schedule every update (--no-sched-on-updates: once per epoch)")
    group.add_argument("--warmup-epochs", type=float, default=5, help="linear warm-up from --warmup-lr")
    group.add_argument("--warmup-lr", type=float, default=1e-6, help="lr at the start of warm-up")
    group.add_argument("--warmup-prefix", action="store_true", default=False,
                       help="warm-up epochs come before the schedule instead of inside it")
    group.add_argument("--min-lr", type=float, default=1e-5, help="lower bound of cyclic schedules")
    group.add_argument("--cooldown-epochs", type=int, default=0, help="epochs at --min-lr after the schedule")
    group.add_argument("--decay-epochs", type=float, default=None, help="step/wsd schedules")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], help="multistep schedule")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, help="step schedules' decay factor")
    group.add_argument("--patience-epochs", type=int, default=10, help="plateau schedule (refused)")
    group.add_argument("--lr-noise", type=float, nargs="+", default=None, metavar="PCT", help="lr noise on/off epochs")
    group.add_argument("--lr-noise-pct", type=float, default=0.67, help="lr noise limit")
    group.add_argument("--lr-noise-std", type=float, default=1.0, help="lr noise std")
    group.add_argument("--lr-cycle-mul", type=float, default=1.0, help="cycle length multiplier")
    group.add_argument("--lr-cycle-decay", type=float, default=0.5, help="lr decay per cycle")
    group.add_argument("--lr-cycle-limit", type=int, default=1, help="number of cycles")
    group.add_argument("--lr-k-decay", type=float, default=1.0, help="k-decay of cosine/poly schedules")

    group = parser.add_argument_group("run")
    group.add_argument("--output", default=None,
                       help="run directory (default: output/train/<model>); with --experiment its parent")
    group.add_argument("--experiment", default="", help="run name: the run directory becomes <--output>/<NAME>")
    group.add_argument("--resume", default=None, help="'auto' (newest intact checkpoint in the run directory), "
                       "a run dir or a checkpoint file")
    group.add_argument("--no-resume-opt", action="store_true", default=False,
                       help="on resume, restore the weights but not the optimizer and loss-scaler state")
    group.add_argument("--save-every-steps", "--recovery-interval", dest="save_every_steps", type=int, default=0,
                       help="also checkpoint every N updates (0: epoch ends only)")
    group.add_argument("--keep-last", "--checkpoint-hist", dest="keep_last", type=int, default=3,
                       help="checkpoint sets kept in <output>/checkpoints (newest ones)")
    group.add_argument("--eval-interval", "--val-interval", dest="eval_interval", type=int, default=1,
                       help="evaluate every N epochs (0: last epoch only)")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="metric that picks the best checkpoint")
    group.add_argument("--seed", type=int, default=42, help="random seed")
    group.add_argument("--deterministic", action=_BOOL, default=False, help="torch deterministic algorithms")
    group.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    group.add_argument("--device-modules", nargs="+", default=None, help="modules to import first (device backends)")
    group.add_argument("--amp", action=_BOOL, default=None, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                       help="float16 adds timm's NativeScaler")
    group.add_argument("--synchronize-step", action="store_true", default=False,
                       help="torch.cuda.synchronize() after every step")
    group.add_argument("--dist-backend", default=None, help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--no-ddp-bb", action="store_true", help="DDP without buffer broadcast")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=0,
                       help="set by torch.distributed.launch; ignored (LOCAL_RANK is read from the environment)")
    group.add_argument("--progress", action=_BOOL, default=True, help="tqdm bars (otherwise log lines)")
    group.add_argument("--log-interval", type=int, default=50, help="steps between progress updates")
    group.add_argument("--tensorboard", action=_BOOL, default=False, help="TensorBoard events (if installed)")
    group.add_argument("--log-wandb", action="store_true", default=False,
                       help="log the summary rows to Weights & Biases (if wandb is installed)")
    group.add_argument("--wandb-project", default=None, help="wandb project")
    group.add_argument("--wandb-tags", nargs="+", default=[], help="wandb tags")
    group.add_argument("--wandb-resume-id", default="", help="wandb run id to continue")
    add_refused(parser, REFUSED, "timm train.py flags that linvision refuses (the reason is the help)")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` after loading ``-c/--config`` and ``--set`` defaults (unknown keys are an error);
    refused timm flags and a missing data directory stop with ``parser.error``."""
    parser = build_parser()
    args = parse_args_with_config(parser, argv)
    check_refused(parser, args, REFUSED)
    data_dir_from_args(parser, args)
    if args.drop_path is None and args.drop_connect is not None:
        args.drop_path = args.drop_connect
    if args.in_chans is None:
        args.in_chans = args.input_size[0] if args.input_size else 3
    args.output = run_dir(args.output, args.experiment, args.model)
    args.experiment = ""  # consumed: the saved config names the run directory itself, and reads back as such
    import_device_modules(args.device_modules)
    return args


def main(argv: Optional[List[str]] = None) -> dict:
    parser = build_parser()
    args = parse_args(argv)
    try:
        return train(args, config=config_dict(args, parser))
    except InputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    run_then_destroy_process_group(main)
