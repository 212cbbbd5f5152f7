"""Run configuration: the typed settings of a training run (:class:`TrainConfig`) and of an evaluation
(:class:`EvalConfig`), YAML files of flag defaults, ``--set key=value`` overrides, the saved resolved config.

A config has one field per flag of its program (:func:`linvision.training.cli.build_train_parser`,
:func:`~linvision.training.cli.build_eval_parser`), named as timm names the flag's destination; its
defaults are the flags' defaults (the parsers read them from here). It is built once, from the
command line, and handed to :func:`linvision.training.trainer.train` or
:func:`linvision.training.evaluation.evaluate_checkpoint`; nothing below reads flags again.

Precedence, lowest first: the field defaults < ``-c/--config FILE`` (YAML mapping of flag names,
``-`` or ``_``) < ``--set key=value`` (any number; the value is read as YAML: ``--set
scale=[0.5,1.0]``, ``--set amp=false``) < the flags themselves (``--lr 1e-3``). Unknown keys are an
error (a typo must not train with a default silently). Every run writes its resolved config as
``<output>/config.yaml``, which ``-c`` reads back to repeat the run.
"""
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Type, TypeVar

import yaml

from ..checkpoint import atomic_write
from .common import plain

__all__ = ["TrainConfig", "EvalConfig", "ModelSpec", "load_config", "parse_sets", "save_config"]

C = TypeVar("C", bound="_FlagConfig")


@dataclass(frozen=True)
class ModelSpec:
    """What ``timm.create_model`` needs to build a run's model; shared by training and evaluation.

    ``None`` rates and norms leave the model's own defaults (timm drops ``None`` keyword arguments).
    """
    name: str
    pretrained: bool = False
    in_chans: int = 3
    drop_rate: Optional[float] = None
    drop_path_rate: Optional[float] = None
    drop_block_rate: Optional[float] = None
    global_pool: Optional[str] = None
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    fast_norm: bool = False
    head_init_scale: Optional[float] = None
    head_init_bias: Optional[float] = None
    allow_mismatch: bool = False

    def create_kwargs(self, num_classes: int) -> Dict[str, Any]:
        """``timm.create_model`` keyword arguments (``model_kwargs`` may not repeat the named ones)."""
        return dict(pretrained=self.pretrained, num_classes=num_classes, in_chans=self.in_chans,
                    drop_path_rate=self.drop_path_rate, drop_rate=self.drop_rate,
                    drop_block_rate=self.drop_block_rate, global_pool=self.global_pool,
                    bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, **dict(self.model_kwargs))


class _FlagConfig:
    """Construction shared by the two configs: from parsed values, with types checked for ``None``."""

    @classmethod
    def defaults(cls) -> Dict[str, Any]:
        """Every field's default (fresh containers), the parsers' flag defaults."""
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                for f in dataclasses.fields(cls)}

    @classmethod
    def from_values(cls: Type[C], values: Mapping[str, Any]) -> C:
        """The config of ``values`` (parsed flags; keys that are no field, such as refused flags, are
        left out).

        Raises:
            ValueError: a ``null`` (``None``) for a setting that has no ``None`` meaning.
        """
        hints = typing.get_type_hints(cls)
        chosen = {}
        for f in dataclasses.fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            if value is None and type(None) not in typing.get_args(hints[f.name]):
                raise ValueError(f"{f.name}: null is not a value of this setting (expected "
                                 f"{getattr(hints[f.name], '__name__', hints[f.name])})")
            chosen[f.name] = value
        return cls(**chosen)

    def to_dict(self) -> Dict[str, Any]:
        """The fields as plain values (YAML/JSON-able), in declaration order."""
        return plain({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})


@dataclass
class TrainConfig(_FlagConfig):
    """The settings of one training run (``tools/train.py``); see ``tools/train.py --help`` for each.

    Fields are grouped as the ``--help`` groups are; types are the parsed values' (lists for
    ``nargs`` flags, ``Dict[str, Any]`` for ``k=v`` flags). The command line resolves ``data_dir``
    (from the positional ``data``), ``drop_path`` (from ``drop_connect``), ``in_chans`` (from
    ``input_size``) and ``output`` (with ``experiment``) before the config is built.
    """
    # data
    data: Optional[str] = None
    data_dir: Optional[str] = None
    dataset: str = ""
    train_split: str = "train"
    val_split: str = "val"
    dataset_download: bool = False
    train_num_samples: Optional[int] = None
    val_num_samples: Optional[int] = None
    class_map: str = ""
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    dataset_trust_remote_code: bool = False
    img_size: Optional[int] = None
    input_size: Optional[List[int]] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    train_interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    batch_size: int = 128
    val_batch_size: Optional[int] = None
    workers: int = 2
    prefetcher: Optional[bool] = None
    pin_mem: Optional[bool] = None
    use_multi_epochs_loader: bool = False

    # model
    model: str = "linvit_t"
    pretrained: bool = False
    pretrained_path: Optional[str] = None
    initial_checkpoint: str = ""
    allow_model_mismatch: bool = False
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    gp: Optional[str] = None
    drop: Optional[float] = None
    drop_path: Optional[float] = None
    drop_connect: Optional[float] = None
    drop_block: Optional[float] = None
    bn_momentum: Optional[float] = None
    bn_eps: Optional[float] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    head_init_scale: Optional[float] = None
    head_init_bias: Optional[float] = None
    grad_checkpointing: bool = False
    fast_norm: bool = False
    channels_last: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    sync_bn: bool = False
    dist_bn: str = "reduce"
    fsdp: bool = False
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    model_ema_decay_base_size: Optional[int] = None
    model_ema_warmup: bool = False

    # augmentation and regularisation
    no_aug: bool = False
    train_crop_mode: Optional[str] = None
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    vflip: float = 0.0
    color_jitter: float = 0.4
    color_jitter_prob: Optional[float] = None
    grayscale_prob: Optional[float] = None
    gaussian_blur_prob: Optional[float] = None
    aa: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    aug_repeats: float = 0
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[List[float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    mixup_off_epoch: int = 0
    smoothing: float = 0.1
    bce_loss: bool = False
    bce_sum: bool = False
    bce_target_thresh: Optional[float] = None
    bce_pos_weight: Optional[float] = None

    # optimisation
    epochs: int = 300
    start_epoch: Optional[int] = None
    opt: str = "adamw"
    opt_eps: Optional[float] = None
    opt_betas: Optional[List[float]] = None
    opt_kwargs: Dict[str, Any] = field(default_factory=dict)
    lr: Optional[float] = 1e-3
    lr_base: float = 5e-4
    lr_base_size: int = 512
    lr_base_scale: str = "linear"
    weight_decay: float = 0.05
    momentum: float = 0.9
    layer_decay: Optional[float] = None
    layer_decay_min_scale: float = 0.0
    layer_decay_no_opt_scale: Optional[float] = None
    clip_grad: Optional[float] = None
    clip_mode: str = "norm"
    grad_accum_steps: int = 1
    sched: str = "cosine"
    sched_on_updates: bool = True
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    warmup_prefix: bool = False
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    decay_epochs: Optional[float] = None
    decay_milestones: List[int] = field(default_factory=lambda: [90, 180, 270])
    decay_rate: float = 0.1
    patience_epochs: int = 10
    lr_noise: Optional[List[float]] = None
    lr_noise_pct: float = 0.67
    lr_noise_std: float = 1.0
    lr_cycle_mul: float = 1.0
    lr_cycle_decay: float = 0.5
    lr_cycle_limit: int = 1
    lr_k_decay: float = 1.0

    # run
    output: Optional[str] = None
    experiment: str = ""
    resume: Optional[str] = None
    no_resume_opt: bool = False
    save_every_steps: int = 0
    keep_last: int = 3
    eval_interval: int = 1
    eval_metric: str = "top1"
    seed: int = 42
    deterministic: bool = False
    device: Optional[str] = None
    device_modules: Optional[List[str]] = None
    amp: Optional[bool] = None
    amp_dtype: str = "bfloat16"
    synchronize_step: bool = False
    dist_backend: Optional[str] = None
    no_ddp_bb: bool = False
    local_rank: int = 0
    progress: bool = True
    log_interval: int = 50
    tensorboard: bool = False
    log_wandb: bool = False
    wandb_project: Optional[str] = None
    wandb_tags: List[str] = field(default_factory=list)
    wandb_resume_id: str = ""

    def model_spec(self) -> ModelSpec:
        """The model to build: ``model`` with the drop rates, norms and ``model_kwargs`` given."""
        return ModelSpec(self.model, pretrained=self.pretrained, in_chans=self.in_chans or 3, drop_rate=self.drop,
                         drop_path_rate=self.drop_path, drop_block_rate=self.drop_block, global_pool=self.gp,
                         bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, model_kwargs=dict(self.model_kwargs or {}),
                         fast_norm=self.fast_norm, head_init_scale=self.head_init_scale,
                         head_init_bias=self.head_init_bias, allow_mismatch=self.allow_model_mismatch)

    def data_overrides(self) -> Dict[str, Any]:
        """The input settings given (``None``: the model's pretrained cfg decides)."""
        return dict(in_chans=self.in_chans, img_size=self.img_size, input_size=self.input_size,
                    crop_pct=self.crop_pct, crop_mode=None, interpolation=self.interpolation, mean=self.mean,
                    std=self.std)


@dataclass
class EvalConfig(_FlagConfig):
    """The settings of one evaluation (``tools/eval.py``, ``tools/validate.py``); see ``--help``.

    ``model`` and the input settings left ``None`` are filled from a linvision checkpoint's metadata.
    """
    # model
    model: Optional[str] = None
    model_list: Optional[str] = None
    checkpoint: Optional[str] = None
    pretrained: bool = False
    allow_model_mismatch: bool = False
    use_ema: Optional[bool] = None
    num_classes: Optional[int] = None
    in_chans: Optional[int] = None
    gp: Optional[str] = None
    model_kwargs: Optional[Dict[str, Any]] = None
    reparam: bool = False
    fast_norm: bool = False

    # data
    data: Optional[str] = None
    data_dir: Optional[str] = None
    dataset: str = ""
    split: str = "val"
    num_samples: Optional[int] = None
    dataset_download: bool = False
    class_map: str = ""
    input_key: Optional[str] = None
    target_key: Optional[str] = None
    dataset_trust_remote_code: bool = False
    img_size: Optional[int] = None
    input_size: Optional[List[int]] = None
    use_train_size: bool = False
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None
    crop_border_pixels: Optional[int] = None
    interpolation: Optional[str] = None
    mean: Optional[List[float]] = None
    std: Optional[List[float]] = None
    batch_size: int = 256
    workers: int = 2
    prefetcher: Optional[bool] = None
    pin_mem: Optional[bool] = None

    # run
    device: Optional[str] = None
    device_modules: Optional[List[str]] = None
    amp: Optional[bool] = None
    amp_dtype: str = "bfloat16"
    channels_last: bool = False
    torchcompile: Optional[str] = None
    torchcompile_mode: Optional[str] = None
    dist_backend: Optional[str] = None
    retry: bool = False
    seed: int = 42
    log_freq: int = 10
    progress: bool = True
    results_file: str = ""
    results_format: str = "csv"

    def model_spec(self) -> ModelSpec:
        """The model to build: ``model`` (its own drop rates), ``gp`` and ``model_kwargs``."""
        return ModelSpec(self.model, pretrained=self.pretrained, in_chans=self.in_chans or 3, global_pool=self.gp,
                         model_kwargs=dict(self.model_kwargs or {}), fast_norm=self.fast_norm,
                         allow_mismatch=self.allow_model_mismatch)

    def data_overrides(self) -> Dict[str, Any]:
        """The input settings given (``None``: the checkpoint's or the model's)."""
        return dict(in_chans=self.in_chans, img_size=self.img_size, input_size=self.input_size,
                    crop_pct=self.crop_pct, crop_mode=self.crop_mode, interpolation=self.interpolation,
                    mean=self.mean, std=self.std)


# ----------------------------------------------------------------------------------------------
# YAML files


def load_config(path: str) -> Dict[str, Any]:
    """A YAML mapping of flag names to values, keys normalised to ``snake_case``."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def parse_sets(items: Iterable[str]) -> Dict[str, Any]:
    """``["lr=1e-3", "scale=[0.5, 1.0]"]`` -> ``{"lr": "1e-3", "scale": [0.5, 1.0]}`` (YAML values;
    argparse later converts string values with the flag's type)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def save_config(settings: Mapping[str, Any], path, header: Sequence[str] = ()) -> Path:
    """Atomically write ``settings`` as YAML, with ``header`` lines as comments on top."""
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(dict(settings), sort_keys=False, default_flow_style=None)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)
