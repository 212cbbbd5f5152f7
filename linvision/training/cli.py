"""The command lines of ``tools/train.py`` and ``tools/eval.py`` (``tools/validate.py``): their parsers,
the typed config each builds once (:class:`~linvision.training.config.TrainConfig`,
:class:`~linvision.training.config.EvalConfig`), and the programs' ``main``.

The tools accept timm's ``train.py`` / ``validate.py`` command lines. Flags that linvision cannot
honour with timm's meaning are still parsed, so that a pasted command stops with one line saying
why (``error: --aug-splits is not supported: ...``) instead of argparse's "unrecognized
arguments"; their defaults are timm's, so a timm ``args.yaml`` given to ``-c`` passes. Flags keep
timm's aliases (``--val-interval``, ``--recovery-interval``, ``--checkpoint-hist``...).
"""
import argparse
import fnmatch
import importlib
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import timm
import yaml
from timm.utils import ParseKwargs

from .common import InputError, plain
from .config import EvalConfig, TrainConfig, load_config, parse_sets
from .evaluation import evaluate_checkpoint, evaluate_many, write_results
from .trainer import train

__all__ = ["build_train_parser", "parse_train_args", "train_main", "build_eval_parser", "parse_eval_args",
           "eval_main", "bulk_jobs", "config_dict", "parse_args_with_config", "HelpFormatter", "Refused",
           "TRAIN_REFUSED", "EVAL_REFUSED", "NOT_CONFIG_KEYS"]

TRAIN_DESCRIPTION = "Train a timm/linvision model on ImageNet-style data (one process, or many through torchrun)."
EVAL_DESCRIPTION = ("Evaluate a checkpoint, registry weights or --pretrained on a folder, tar or timm source: "
                    "top-1, top-5, images/s.")
# Parser destinations that describe how the config was given, not the run.
NOT_CONFIG_KEYS = ("help", "config", "set")
_BOOL = argparse.BooleanOptionalAction


# ----------------------------------------------------------------------------------------------
# Flags shared by both programs

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, including options without a help text (argparse's
    own formatter skips those, which hid the defaults of ``--epochs`` and ``--warmup-epochs``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text + " " if text else "") + "(default: %(default)s)"
        return text


class Refused:
    """A timm flag that is parsed but refused when set to anything but timm's default.

    Args:
        flags: its option strings, e.g. ``("--aug-splits",)``.
        reason: why linvision does not honour it (shown in ``--help`` and in the error).
        default: timm's default (a timm ``args.yaml`` holds it).
        kind: ``"switch"`` (store_true), ``"value"`` (one value) or ``"values"`` (``nargs='+'``).
    """

    def __init__(self, flags: Sequence[str], reason: str, default: Any = None, kind: str = "value"):
        self.flags, self.reason, self.default, self.kind = tuple(flags), reason, default, kind

    @property
    def dest(self) -> str:
        long = [f for f in self.flags if f.startswith("--")][0]
        return long[2:].replace("-", "_")


def add_refused(parser: argparse.ArgumentParser, refused: Iterable[Refused], title: str) -> None:
    """Add ``refused`` flags to ``parser`` in their own ``--help`` group, with the reason as help."""
    group = parser.add_argument_group(title)
    for r in refused:
        if r.kind == "switch":
            group.add_argument(*r.flags, dest=r.dest, action="store_true", default=bool(r.default), help=r.reason)
        else:
            group.add_argument(*r.flags, dest=r.dest, default=r.default, help=r.reason, metavar="X",
                               nargs="+" if r.kind == "values" else None)


def check_refused(parser: argparse.ArgumentParser, args: argparse.Namespace, refused: Iterable[Refused]) -> None:
    """``parser.error`` (exit status 2, one line) on the first refused flag set to a non-default value."""
    for r in refused:
        value = getattr(args, r.dest, r.default)
        if value is None or value == r.default or (r.kind == "values" and list(value) == list(r.default or [])):
            continue
        if r.kind == "value" and r.default is not None and str(value) == str(r.default):
            continue
        parser.error(f"{r.flags[-1]} is not supported: {r.reason}")


def data_dir_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """timm's rule: the positional ``DIR`` is the data directory unless ``--data-dir`` is given."""
    positional = getattr(args, "data", None)
    if positional and not args.data_dir:
        args.data_dir = positional
    if not args.data_dir:
        parser.error("the data directory is required: pass it as the positional DIR or with --data-dir")


def run_dir(output: Optional[str], experiment: Optional[str], model: str) -> str:
    """The run directory: ``--output`` itself, or ``<--output or output/train>/<--experiment>``.

    timm's ``train.py`` always adds a sub-directory (``--experiment``, else a time-stamped name);
    linvision uses ``--output`` as the run directory unless ``--experiment`` is given, so that a
    restarted job with the same command finds its checkpoints (``--resume auto``)."""
    if experiment:
        return str(Path(output or "output/train") / experiment)
    return output or f"output/train/{model}"


def import_device_modules(modules: Optional[Sequence[str]]) -> None:
    """timm's ``--device-modules``: import each module (one that registers a device backend)."""
    for name in modules or ():
        importlib.import_module(name)


# ----------------------------------------------------------------------------------------------
# -c/--config and --set

def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` after applying ``-c/--config`` and ``--set`` as defaults.

    The parser must define ``-c/--config`` and ``--set`` (``action="append"``) itself so that they
    show in ``--help``; errors go through ``parser.error`` (exit status 2)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    cfg: Dict[str, Any] = {}
    if known.config:
        try:
            cfg = load_config(known.config)
        except (OSError, yaml.YAMLError, ValueError) as e:
            parser.error(f"cannot read config {known.config}: {e}")
    try:
        cfg.update(parse_sets(known.set))
    except (ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    actions = {a.dest: a for a in parser._actions}
    cfg = _alias_keys(parser, cfg)
    # timm's args.yaml records its own -c as ``config: ''``: an empty entry names no second file.
    cfg = {k: v for k, v in cfg.items() if not (k in NOT_CONFIG_KEYS and v in ("", None, []))}
    unknown = sorted(set(cfg) - set(actions) | set(cfg) & set(NOT_CONFIG_KEYS))
    if unknown:
        where = known.config if known.config else "--set"
        parser.error(f"{where}: unknown keys {unknown}")
    parser.set_defaults(**cfg)
    for dest in cfg:
        actions[dest].required = False  # a config may provide --data-dir
    return parser.parse_args(argv)


def _alias_keys(parser: argparse.ArgumentParser, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Keys named after an alias flag (timm's ``val_interval`` for ``--val-interval``, an alias of
    ``--eval-interval``) renamed to that flag's destination; ``no_X: true`` of a ``--X/--no-X``
    switch becomes ``X: false`` (``no_X: false`` leaves ``X`` at its default)."""
    by_flag = {opt: a for a in parser._actions for opt in a.option_strings}
    dests = {a.dest for a in parser._actions}
    out: Dict[str, Any] = {}
    for key, value in cfg.items():
        action = None if key in dests else by_flag.get("--" + key.replace("_", "-"))
        if action is None:
            out[key] = value
        elif isinstance(action, argparse.BooleanOptionalAction) and key.startswith("no_"):
            if value:
                out[action.dest] = False
        else:
            out[action.dest] = value
    return out


def config_dict(args: Any, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The run's settings as plain values: every parser destination except :data:`NOT_CONFIG_KEYS`,
    from ``args`` (a namespace or a config; a refused flag, which no config holds, at its default)."""
    actions = [a for a in parser._actions if a.dest not in NOT_CONFIG_KEYS and a.dest != argparse.SUPPRESS]
    return {a.dest: plain(getattr(args, a.dest, a.default)) for a in actions}


# ----------------------------------------------------------------------------------------------
# tools/train.py

_NAFLEX = "the NaFlex loader feeds ViT patch sequences; linvision backbones take images"
_MULTIRES = "multi-resolution / variable-batch schedules are not supported: the resumable sampler fixes one batch size"
_KD = "knowledge distillation is not implemented in linvision's training loop"
_AUGMIX = ("AugMix split batches (JSD loss, split BatchNorm) are not supported by the per-sample-seeded "
           "resumable loader; use --aa augmix-... without splits")
# timm train.py flags that are parsed but refused.
TRAIN_REFUSED = [
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


def build_train_parser() -> argparse.ArgumentParser:
    """``tools/train.py``'s parser: timm train.py's flags (defaults: :class:`TrainConfig`'s), ``-c``, ``--set``."""
    parser = argparse.ArgumentParser(description=TRAIN_DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("-c", "--config", default=None, help="YAML file of flag defaults (timm's args.yaml too)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key (YAML value); repeatable")

    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", metavar="DIR", help="data directory (timm's positional form)")
    group.add_argument("--data-dir", "--data", dest="data_dir",
                       help="dataset root (ImageFolder splits, <split>.tar, or a source root); or the positional DIR")
    group.add_argument("--dataset", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--train-split")
    group.add_argument("--val-split", help="also found as validation/valid/eval/test")
    group.add_argument("--dataset-download", action=_BOOL, help="let torch/ sources download")
    group.add_argument("--train-num-samples", type=int, help="epoch size of an iterable source")
    group.add_argument("--val-num-samples", type=int)
    group.add_argument("--class-map", help="file of class names (one per line) fixing the class index")
    group.add_argument("--input-key", help="image field of a hfds/wds/tfds source")
    group.add_argument("--target-key", help="label field of a hfds/wds/tfds source")
    group.add_argument("--dataset-trust-remote-code", action="store_true",
                       help="let a hfds source run its loading script")
    group.add_argument("--img-size", type=int, help="input size (default: the model's)")
    group.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                       help="full input size; overrides --img-size (C also sets --in-chans when unset)")
    group.add_argument("--crop-pct", type=float, help="eval centre-crop fraction")
    group.add_argument("--interpolation", help="resize interpolation (default: the model's)")
    group.add_argument("--train-interpolation", help="random-resized-crop interpolation (default: --interpolation)")
    group.add_argument("--mean", **_floats("+"), help="normalisation mean per channel")
    group.add_argument("--std", **_floats("+"), help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, help="per process")
    group.add_argument("--val-batch-size", "-vb", "--validation-batch-size", dest="val_batch_size", type=int,
                       help="default: 2x --batch-size")
    group.add_argument("--workers", "-j", type=int, help="data-loading processes per rank (0: in the main one)")
    group.add_argument("--prefetcher", action=_BOOL,
                       help="uint8 batches normalised/erased on the device (default: on for CUDA)")
    group.add_argument("--pin-mem", action=_BOOL, help="pinned host memory (default: on for CUDA)")
    group.add_argument("--use-multi-epochs-loader", action="store_true",
                       help="keep loader workers across epochs (always done: persistent workers)")

    group = parser.add_argument_group("model")
    group.add_argument("--model", help="timm model name")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--pretrained-path",
                       help="file to use as the pretrained weights (implies --pretrained; a different head is dropped)")
    group.add_argument("--initial-checkpoint", help="weights to start from (strict load, no optimizer state)")
    group.add_argument("--allow-model-mismatch", action="store_true",
                       help="load a linvision checkpoint written by another model name (refused by default)")
    group.add_argument("--num-classes", type=int, help="default: number of classes in the data")
    group.add_argument("--in-chans", type=int, help="input channels; 1 loads images as greyscale "
                       "(default: --input-size's C, else 3)")
    group.add_argument("--gp", metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--drop", type=float, help="dropout before the classifier")
    group.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the model's)")
    group.add_argument("--drop-connect", type=float, help="timm's old name of --drop-path")
    group.add_argument("--drop-block", type=float, help="DropBlock rate (models that take it)")
    group.add_argument("--bn-momentum", type=float, help="BatchNorm momentum (models that take it)")
    group.add_argument("--bn-eps", type=float, help="BatchNorm epsilon (models that take it)")
    group.add_argument("--model-kwargs", nargs="*", action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")
    group.add_argument("--head-init-scale", type=float, help="multiply the classifier weights by this")
    group.add_argument("--head-init-bias", type=float, help="fill the classifier bias with this")
    group.add_argument("--grad-checkpointing", action=_BOOL, help="activation checkpointing per block")
    group.add_argument("--fast-norm", action="store_true", help="timm's fast (low-precision) norm layers")
    group.add_argument("--channels-last", action=_BOOL, help="NHWC memory format")
    group.add_argument("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                       help="torch.compile the model with this backend (a mode name such as max-autotune is "
                            "taken as --torchcompile-mode)")
    group.add_argument("--torchcompile-mode", help="torch.compile mode (default, reduce-overhead, max-autotune)")
    group.add_argument("--sync-bn", action=_BOOL, help="SyncBatchNorm across ranks")
    group.add_argument("--dist-bn", choices=("reduce", "broadcast", ""),
                       help="sync BatchNorm statistics at epoch end (without --sync-bn)")
    group.add_argument("--fsdp", action=_BOOL,
                       help="shard parameters, gradients and optimizer state with FSDP2 (distributed runs)")
    group.add_argument("--model-ema", action=_BOOL, help="keep (and evaluate) an EMA of the weights")
    group.add_argument("--model-ema-decay", type=float)
    group.add_argument("--model-ema-decay-base-size", type=int,
                       help="raise the decay to the power global_batch/SIZE (the MAViT/RAVLT rule)")
    group.add_argument("--model-ema-warmup", action=_BOOL, help="ModelEmaV3 decay warmup")

    group = parser.add_argument_group("augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="train on resized + centre-cropped images")
    group.add_argument("--train-crop-mode", help="random-resized-crop variant (timm's create_transform)")
    group.add_argument("--scale", **_floats(2), help="random-resized-crop area range")
    group.add_argument("--ratio", **_floats(2), help="random-resized-crop aspect range")
    group.add_argument("--hflip", type=float, help="horizontal flip probability")
    group.add_argument("--vflip", type=float, help="vertical flip probability")
    group.add_argument("--color-jitter", type=float, help="ignored by timm when --aa is set")
    group.add_argument("--color-jitter-prob", type=float, help="probability of applying colour jitter")
    group.add_argument("--grayscale-prob", type=float, help="probability of a greyscale image")
    group.add_argument("--gaussian-blur-prob", type=float, help="probability of a Gaussian blur")
    group.add_argument("--aa", help="auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (RandAugment)")
    group.add_argument("--reprob", type=float, help="random erasing probability")
    group.add_argument("--remode", help="random erasing fill: const, rand, pixel")
    group.add_argument("--recount", type=int, help="random erasing count")
    group.add_argument("--aug-repeats", type=float, help="repeated augmentation (RepeatAugSampler), e.g. 3")
    group.add_argument("--mixup", type=float, help="mixup alpha (0: off)")
    group.add_argument("--cutmix", type=float, help="cutmix alpha (0: off)")
    group.add_argument("--cutmix-minmax", **_floats(2), help="cutmix box ratio range (overrides alpha)")
    group.add_argument("--mixup-prob", type=float, help="probability of mixup or cutmix per batch")
    group.add_argument("--mixup-switch-prob", type=float, help="probability of cutmix when both are on")
    group.add_argument("--mixup-mode", help="batch, pair or elem")
    group.add_argument("--mixup-off-epoch", type=int, help="turn mixup off from this epoch (0: never)")
    group.add_argument("--smoothing", type=float, help="label smoothing")
    group.add_argument("--bce-loss", action=_BOOL, help="binary cross-entropy instead of softmax CE")
    group.add_argument("--bce-sum", action="store_true", help="BCE summed over classes")
    group.add_argument("--bce-target-thresh", type=float, help="binarise BCE targets at this value")
    group.add_argument("--bce-pos-weight", type=float, help="BCE positive-class weight")

    group = parser.add_argument_group("optimisation")
    group.add_argument("--epochs", type=int, help="epochs to train")
    group.add_argument("--start-epoch", type=int,
                       help="start at this epoch (overrides the resumed epoch; the schedule is set to it)")
    group.add_argument("--opt", help="timm optimizer name")
    group.add_argument("--opt-eps", type=float, help="optimizer epsilon")
    group.add_argument("--opt-betas", **_floats("+"), help="optimizer betas")
    group.add_argument("--opt-kwargs", nargs="*", action=ParseKwargs, help="extra optimizer kwargs, k=v ...")
    group.add_argument("--lr", type=float, help="learning rate (null in a config: from --lr-base)")
    group.add_argument("--lr-base", type=float, help="lr for a global batch of --lr-base-size")
    group.add_argument("--lr-base-size", type=int, help="global batch that --lr-base is for")
    group.add_argument("--lr-base-scale", choices=("linear", "sqrt", ""),
                       help="'' picks as timm does: sqrt for ada*/lamb optimizers, else linear")
    group.add_argument("--weight-decay", type=float, help="weight decay (not on 1-D parameters)")
    group.add_argument("--momentum", type=float, help="for SGD-style optimizers")
    group.add_argument("--layer-decay", type=float, help="layer-wise lr decay (group_matcher)")
    group.add_argument("--layer-decay-min-scale", type=float, help="lowest layer-decay lr scale")
    group.add_argument("--layer-decay-no-opt-scale", type=float,
                       help="freeze layers whose layer-decay scale is below this")
    group.add_argument("--clip-grad", type=float, help="gradient clipping threshold")
    group.add_argument("--clip-mode", help="norm, value or agc")
    group.add_argument("--grad-accum-steps", type=int, help="micro-batches per optimizer update")
    group.add_argument("--sched", help="timm scheduler name (none: constant lr; plateau is refused)")
    group.add_argument("--sched-on-updates", action=_BOOL,
                       help="step the schedule every update (--no-sched-on-updates: once per epoch)")
    group.add_argument("--warmup-epochs", type=float, help="linear warm-up from --warmup-lr")
    group.add_argument("--warmup-lr", type=float, help="lr at the start of warm-up")
    group.add_argument("--warmup-prefix", action="store_true",
                       help="warm-up epochs come before the schedule instead of inside it")
    group.add_argument("--min-lr", type=float, help="lower bound of cyclic schedules")
    group.add_argument("--cooldown-epochs", type=int, help="epochs at --min-lr after the schedule")
    group.add_argument("--decay-epochs", type=float, help="step/wsd schedules")
    group.add_argument("--decay-milestones", type=int, nargs="+", help="multistep schedule")
    group.add_argument("--decay-rate", "--dr", type=float, help="step schedules' decay factor")
    group.add_argument("--patience-epochs", type=int, help="plateau schedule (refused)")
    group.add_argument("--lr-noise", type=float, nargs="+", metavar="PCT", help="lr noise on/off epochs")
    group.add_argument("--lr-noise-pct", type=float, help="lr noise limit")
    group.add_argument("--lr-noise-std", type=float, help="lr noise std")
    group.add_argument("--lr-cycle-mul", type=float, help="cycle length multiplier")
    group.add_argument("--lr-cycle-decay", type=float, help="lr decay per cycle")
    group.add_argument("--lr-cycle-limit", type=int, help="number of cycles")
    group.add_argument("--lr-k-decay", type=float, help="k-decay of cosine/poly schedules")

    group = parser.add_argument_group("run")
    group.add_argument("--output",
                       help="run directory (default: output/train/<model>); with --experiment its parent")
    group.add_argument("--experiment", help="run name: the run directory becomes <--output>/<NAME>")
    group.add_argument("--resume", help="'auto' (newest intact checkpoint in the run directory), "
                       "a run dir or a checkpoint file")
    group.add_argument("--no-resume-opt", action="store_true",
                       help="on resume, restore the weights but not the optimizer and loss-scaler state")
    group.add_argument("--save-every-steps", "--recovery-interval", dest="save_every_steps", type=int,
                       help="also checkpoint every N updates (0: epoch ends only)")
    group.add_argument("--keep-last", "--checkpoint-hist", dest="keep_last", type=int,
                       help="checkpoint sets kept in <output>/checkpoints (newest ones)")
    group.add_argument("--eval-interval", "--val-interval", dest="eval_interval", type=int,
                       help="evaluate every N epochs (0: last epoch only)")
    group.add_argument("--eval-metric", choices=("top1", "top5", "loss"),
                       help="metric that picks the best checkpoint")
    group.add_argument("--seed", type=int, help="random seed")
    group.add_argument("--deterministic", action=_BOOL, help="torch deterministic algorithms")
    group.add_argument("--device", help="default: cuda if available, else cpu")
    group.add_argument("--device-modules", nargs="+", help="modules to import first (device backends)")
    group.add_argument("--amp", action=_BOOL, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", choices=("bfloat16", "float16"),
                       help="float16 adds timm's NativeScaler")
    group.add_argument("--synchronize-step", action="store_true",
                       help="torch.cuda.synchronize() after every step")
    group.add_argument("--dist-backend", help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--no-ddp-bb", action="store_true", help="DDP without buffer broadcast")
    group.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                       help="set by torch.distributed.launch; ignored (LOCAL_RANK is read from the environment)")
    group.add_argument("--progress", action=_BOOL, help="tqdm bars (otherwise log lines)")
    group.add_argument("--log-interval", type=int, help="steps between progress updates")
    group.add_argument("--tensorboard", action=_BOOL, help="TensorBoard events (if installed)")
    group.add_argument("--log-wandb", action="store_true",
                       help="log the summary rows to Weights & Biases (if wandb is installed)")
    group.add_argument("--wandb-project", help="wandb project")
    group.add_argument("--wandb-tags", nargs="+", help="wandb tags")
    group.add_argument("--wandb-resume-id", help="wandb run id to continue")
    parser.set_defaults(**TrainConfig.defaults())
    add_refused(parser, TRAIN_REFUSED, "timm train.py flags that linvision refuses (the reason is the help)")
    return parser



def _parse_train(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> TrainConfig:
    args = parse_args_with_config(parser, argv)
    check_refused(parser, args, TRAIN_REFUSED)
    data_dir_from_args(parser, args)
    if args.drop_path is None and args.drop_connect is not None:
        args.drop_path = args.drop_connect
    if args.in_chans is None:
        args.in_chans = args.input_size[0] if args.input_size else 3
    args.output = run_dir(args.output, args.experiment, args.model)
    args.experiment = ""  # consumed: the saved config names the run directory itself, and reads back as such
    import_device_modules(args.device_modules)
    try:
        return TrainConfig.from_values(vars(args))
    except ValueError as e:
        parser.error(str(e))


def parse_train_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The run's config from ``argv``, after ``-c/--config`` and ``--set`` defaults (unknown keys are an
    error); refused timm flags and a missing data directory stop with ``parser.error`` (exit status 2)."""
    return _parse_train(build_train_parser(), argv)


def train_main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/train.py``: parse, train, and exit with ``error: ...`` on bad input; returns
    :func:`~linvision.training.trainer.train`'s result."""
    parser = build_train_parser()
    cfg = _parse_train(parser, argv)
    try:
        return train(cfg, settings=config_dict(cfg, parser))
    except InputError as e:
        sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------------------------
# tools/eval.py and tools/validate.py

# timm validate.py flags that are parsed but refused.
EVAL_REFUSED = [
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



def build_eval_parser() -> argparse.ArgumentParser:
    """``tools/eval.py``'s parser: timm validate.py's flags (defaults: :class:`EvalConfig`'s)."""
    parser = argparse.ArgumentParser(description=EVAL_DESCRIPTION, formatter_class=HelpFormatter)
    group = parser.add_argument_group("model")
    group.add_argument("--model", "-m",
                       help="timm model name (optionally with a weight tag), a file of names, or a wildcard "
                            "(default: from the checkpoint)")
    group.add_argument("--model-list",
                       help="several models: a file of names (one per line) or a comma-separated list")
    group.add_argument("--checkpoint",
                       help=".safetensors / .pth weights, a checkpoint manifest .json, or a directory of checkpoints")
    group.add_argument("--pretrained", action="store_true", help="use the model's registry (pretrained) weights")
    group.add_argument("--allow-model-mismatch", action="store_true",
                       help="load a linvision checkpoint written by another model name (refused by default)")
    group.add_argument("--use-ema", action=_BOOL,
                       help="EMA weights (default: the file given; for a container holding both, the model family's documented choice)")
    group.add_argument("--num-classes", type=int, help="default: the checkpoint's, else the data's")
    group.add_argument("--in-chans", type=int, help="input channels (default: the checkpoint's, else 3)")
    group.add_argument("--gp", metavar="POOL", help="global pool type (default: the model's)")
    group.add_argument("--model-kwargs", nargs="*", action=ParseKwargs,
                       help="extra create_model kwargs, k=v ...")
    group.add_argument("--reparam", action="store_true",
                       help="reparameterise the model for inference (timm.utils.reparameterize_model)")
    group.add_argument("--fast-norm", action="store_true", help="timm's fast (low-precision) norm layers")

    group = parser.add_argument_group("data")
    group.add_argument("data", nargs="?", metavar="DIR", help="data directory (timm's positional form)")
    group.add_argument("--data-dir", "--data", dest="data_dir",
                       help="dataset root, split folder or .tar; or the positional DIR")
    group.add_argument("--dataset", help="timm source: '' (folder/tar), wds/NAME, hfds/NAME, torch/NAME ...")
    group.add_argument("--split", help="split under the data directory (also found as validation...)")
    group.add_argument("--num-samples", type=int, help="size of an iterable source's split")
    group.add_argument("--dataset-download", action="store_true", help="let torch/ sources download")
    group.add_argument("--class-map", help="file of class names fixing the class index")
    group.add_argument("--input-key", help="image field of a hfds/wds/tfds source")
    group.add_argument("--target-key", help="label field of a hfds/wds/tfds source")
    group.add_argument("--dataset-trust-remote-code", action="store_true",
                       help="let a hfds source run its loading script")
    group.add_argument("--img-size", type=int, help="input size (default: the checkpoint's / model's)")
    group.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                       help="full input size; overrides --img-size")
    group.add_argument("--use-train-size", action="store_true",
                       help="the model's train input size even where its cfg has a test size")
    group.add_argument("--crop-pct", type=float, help="centre-crop fraction")
    group.add_argument("--crop-mode", help="center, squash or border")
    group.add_argument("--crop-border-pixels", type=int, help="pixels cropped from each border")
    group.add_argument("--interpolation", help="resize interpolation (default: the model's)")
    group.add_argument("--mean", type=float, nargs="+", help="normalisation mean per channel")
    group.add_argument("--std", type=float, nargs="+", help="normalisation std per channel")
    group.add_argument("--batch-size", "-b", type=int, help="halved automatically on out-of-memory")
    group.add_argument("--workers", "-j", type=int, help="data-loading processes")
    group.add_argument("--prefetcher", action=_BOOL, help="default: on for CUDA")
    group.add_argument("--pin-mem", action=_BOOL, help="pinned host memory (default: on for CUDA)")

    group = parser.add_argument_group("run")
    group.add_argument("--device", help="default: cuda if available, else cpu")
    group.add_argument("--device-modules", nargs="+", help="modules to import first (device backends)")
    group.add_argument("--amp", action=_BOOL, help="autocast (default: on for CUDA, off on CPU)")
    group.add_argument("--amp-dtype", choices=("bfloat16", "float16"), help="autocast dtype")
    group.add_argument("--channels-last", action=_BOOL, help="NHWC memory format")
    group.add_argument("--torchcompile", nargs="?", const="inductor", metavar="BACKEND",
                       help="torch.compile with this backend (a mode name is taken as --torchcompile-mode)")
    group.add_argument("--torchcompile-mode", help="torch.compile mode")
    group.add_argument("--dist-backend", help="default: nccl on CUDA, gloo on CPU")
    group.add_argument("--retry", action="store_true",
                       help="retry with a smaller batch on out-of-memory (always done)")
    group.add_argument("--seed", type=int, help="random seed")
    group.add_argument("--log-freq", type=int, help="timm's per-batch log interval; progress is a tqdm bar")
    group.add_argument("--progress", action=_BOOL, help="tqdm bar")
    group.add_argument("--results-file", help="write the results here (one row per model/checkpoint)")
    group.add_argument("--results-format", choices=("csv", "json"), help="--results-file format")
    parser.set_defaults(**EvalConfig.defaults())
    add_refused(parser, EVAL_REFUSED, "timm validate.py flags that linvision refuses (the reason is the help)")
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


def bulk_jobs(cfg: EvalConfig) -> Tuple[Optional[List[Tuple[Optional[str], Optional[str]]]], EvalConfig]:
    """The ``(model, checkpoint)`` list of a bulk run (``None`` for a single evaluation), and the config
    to run it with (a wildcard ``--model`` means pretrained weights, as in timm's validate.py)."""
    if cfg.checkpoint and Path(cfg.checkpoint).is_dir():
        files = _checkpoints_in(Path(cfg.checkpoint))
        if not files:
            raise InputError(f"--checkpoint {cfg.checkpoint}: no *.safetensors / *.pth / *.pth.tar files")
        return [(cfg.model, f) for f in files], cfg
    names = None
    if cfg.model_list:
        names = _names(cfg.model_list)
    elif cfg.model and Path(cfg.model).is_file():
        names = _names(cfg.model)
    elif cfg.model and any(c in cfg.model for c in "*?[") and not timm.is_model(cfg.model):
        names = timm.list_models(cfg.model, pretrained=True) or [
            n for n in timm.list_models() if fnmatch.fnmatch(n, cfg.model)]
        cfg = replace(cfg, pretrained=True)
    if names is None:
        return None, cfg
    if not names:
        raise InputError(f"no models in {cfg.model_list or cfg.model}")
    return [(name, cfg.checkpoint) for name in names], cfg


def parse_eval_args(argv: Optional[Sequence[str]] = None) -> EvalConfig:
    """The evaluation's config from ``argv``; refused timm flags and a missing data directory stop with
    ``parser.error`` (exit status 2)."""
    parser = build_eval_parser()
    args = parser.parse_args(argv)
    check_refused(parser, args, EVAL_REFUSED)
    data_dir_from_args(parser, args)
    import_device_modules(args.device_modules)
    return EvalConfig.from_values(vars(args))


def eval_main(argv: Optional[Sequence[str]] = None):
    """``tools/eval.py``: one evaluation (its metrics) or a bulk run (its rows, best first), written to
    ``--results-file`` when given; exits with ``error: ...`` on bad input."""
    cfg = parse_eval_args(argv)
    try:
        jobs, cfg = bulk_jobs(cfg)
        if jobs is None:
            result = evaluate_checkpoint(cfg)
            rows = None
        else:
            rows = evaluate_many(cfg, jobs)
            result = rows
        if cfg.results_file:
            if rows is None:
                rows = [dict(result, top1_err=round(100 - result["top1"], 4),
                             top5_err=round(100 - result["top5"], 4), checkpoint=result["weights"])]
            path = write_results(cfg.results_file, rows, cfg.results_format)
            print(f"results: {path} ({len(rows)} row{'s' if len(rows) != 1 else ''})")
        if jobs is not None:
            print(f"--result\n{json.dumps(result, indent=2, default=str)}")
        return result
    except InputError as e:
        sys.exit(f"error: {e}")
