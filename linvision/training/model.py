"""The model of a run and how it computes: building it (registry, weights files), its input
preprocessing, device, autocast dtype, memory format and ``torch.compile`` settings.

Shared by training (:mod:`.trainer`) and evaluation (:mod:`.evaluation`); what model to build comes
as a :class:`~linvision.training.config.ModelSpec`.
"""
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

import timm
from timm.data import resolve_data_config as timm_resolve_data_config

from ..serialization import CheckpointError, check_checkpoint_model, load_checkpoint_file, unwrap_checkpoint
from .common import InputError
from .config import ModelSpec

__all__ = ["resolve_device", "resolve_amp_dtype", "autocast", "compile_settings", "COMPILE_MODES",
           "resolve_data_config", "build_model", "load_weights_file", "to_channels_last", "unwrap"]

_AMP_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
# torch.compile modes; any other --torchcompile value is a backend name (timm's meaning).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# ----------------------------------------------------------------------------------------------
# Device, precision, compilation

def resolve_device(name: Optional[str] = None) -> torch.device:
    """``name`` as a device; ``None`` picks ``cuda`` when a GPU is visible, else ``cpu``."""
    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    return device


def resolve_amp_dtype(amp: Optional[bool], device: torch.device, dtype: str = "bfloat16") -> Optional[torch.dtype]:
    """Autocast dtype, or None for full precision.

    ``amp`` None (auto) means on for CUDA, off on CPU (slower there). ``dtype`` is ``bfloat16``
    (the project default: its range matches fp32, so no loss scaler is needed, and the attention
    sums accumulate in fp32 whatever the autocast dtype) or ``float16`` (the official MAViT/RAVLT
    recipes; trained with timm's ``NativeScaler``)."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return None
    if dtype not in _AMP_DTYPES:
        raise InputError(f"--amp-dtype {dtype!r}: expected bfloat16 or float16")
    return _AMP_DTYPES[dtype]


def autocast(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` on ``device`` in ``amp_dtype``; a disabled context for ``None``."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


def compile_settings(torchcompile: Optional[str], torchcompile_mode: Optional[str]) -> Tuple[Optional[str], str]:
    """``(mode or None when not compiling, backend)`` from ``--torchcompile [BACKEND]`` and
    ``--torchcompile-mode``. A mode name given to ``--torchcompile`` (``default``,
    ``reduce-overhead``, ...) is taken as the mode with the inductor backend (linvision's
    shorthand); anything else is timm's backend name."""
    if torchcompile is None:
        return None, "inductor"
    if torchcompile in COMPILE_MODES:
        return torchcompile_mode or torchcompile, "inductor"
    return torchcompile_mode or "default", torchcompile


# ----------------------------------------------------------------------------------------------
# Preprocessing

def resolve_data_config(overrides: Mapping[str, Any], model: nn.Module, use_test_size: bool = False) -> Dict[str, Any]:
    """timm's data config (input size, interpolation, mean/std, crop) from the model's pretrained cfg,
    with the settings given in ``overrides`` (``in_chans``, ``img_size``, ``input_size``,
    ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``; ``None``: the model's).
    Mean/std are reduced to ``in_chans`` values when the model cfg has 3.
    ``use_test_size``: the cfg's ``test_input_size`` where it has one (timm's validate.py default)."""
    cfg = timm_resolve_data_config(dict(overrides), model=model, use_test_size=use_test_size)
    in_chans = cfg["input_size"][0]
    for key in ("mean", "std"):
        if len(cfg[key]) != in_chans:
            # An RGB cfg on a greyscale model: torchvision's Normalize would silently broadcast a
            # 1-channel image to 3 channels, so use the channel average instead.
            cfg[key] = (float(np.mean(cfg[key])),) * in_chans
    return cfg


# ----------------------------------------------------------------------------------------------
# Building

def build_model(spec: ModelSpec, num_classes: int, **overrides) -> nn.Module:
    """``timm.create_model(spec.name, ...)`` with the spec's keyword arguments (``overrides`` win),
    then the classifier scaled / its bias filled as the spec asks. The linvision families are
    registered with timm already: importing this package runs ``linvision/__init__``.

    Raises:
        InputError: an unknown model name, or an option the model does not take.
    """
    if ":" not in spec.name and not timm.is_model(spec.name):
        close = timm.list_models(f"*{spec.name.split('_')[0]}*")[:10]
        raise InputError(f"unknown model {spec.name!r}" + (f"; similar: {', '.join(close)}" if close else ""))
    # None values are dropped by timm.create_model, so models without e.g. bn_eps are unaffected.
    kwargs = spec.create_kwargs(num_classes)
    kwargs.update(overrides)
    if spec.fast_norm:
        from timm.layers import set_fast_norm
        set_fast_norm()
    try:
        model = timm.create_model(spec.name, **kwargs)
    except TypeError as e:
        raise InputError(f"{spec.name} does not take one of the options given ({e})") from e
    if spec.head_init_scale is not None or spec.head_init_bias is not None:
        head = model.get_classifier()
        with torch.no_grad():
            if spec.head_init_scale is not None and getattr(head, "weight", None) is not None:
                head.weight.mul_(spec.head_init_scale)
            if spec.head_init_bias is not None and getattr(head, "bias", None) is not None:
                head.bias.fill_(spec.head_init_bias)
    return model


def load_weights_file(spec: ModelSpec, path: os.PathLike, num_classes: int, *, what: str,
                      pretrained_semantics: bool = False, use_ema: Optional[bool] = None) -> nn.Module:
    """Build ``spec``'s model with the weights of ``path`` (read by :func:`load_checkpoint_file`).

    A linvision ``.safetensors`` must have been written by the same model name unless
    ``spec.allow_mismatch``; it is loaded strictly. Other files (official ``.pth``, plain state
    dicts) go through the model family's ``checkpoint_filter_fn``. ``pretrained_semantics``
    (``--pretrained-path``) lets timm drop a classifier of another size, as for registry weights;
    otherwise the classifier must fit (``--initial-checkpoint``).

    Raises:
        InputError: missing, unsafe or damaged file, another model's file, or shapes that do not fit;
            the message starts with ``what`` (the flag).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {path}: no such file")
    try:
        written_by = check_checkpoint_model(path, spec.name, allow=spec.allow_mismatch)
        checkpoint = load_checkpoint_file(path)
    except CheckpointError as e:
        raise InputError(f"{what}: {e}") from None
    try:
        if written_by and not pretrained_semantics:
            model = build_model(spec, num_classes, pretrained=False)
            model.load_state_dict(checkpoint, strict=True)
            return model
        if use_ema is not None and isinstance(checkpoint, dict):
            checkpoint = unwrap_checkpoint(checkpoint, prefer_ema=use_ema)
        overlay = dict(state_dict=checkpoint)
        if not pretrained_semantics:
            overlay["num_classes"] = num_classes  # the classifier must fit: no silent re-initialisation
        return build_model(spec, num_classes, pretrained=True, pretrained_cfg_overlay=overlay)
    except (RuntimeError, KeyError, ValueError) as e:
        raise InputError(f"{what} {path} does not fit {spec.name} with {num_classes} classes and "
                         f"{spec.in_chans} input channels:\n{e}") from e


def to_channels_last(model: nn.Module) -> nn.Module:
    """Put ``model``'s convolution weights (and 4-D buffers) in channels_last, in place.

    Other 4-D parameters, such as layer scales of shape ``(1, C, 1, 1)``, keep the default layout.
    Their gradients come out of reductions in that layout. With size-1 dims, both layouts count as
    contiguous, so autograd does not restride such a gradient. DDP then finds gradient strides that
    differ from the parameter's bucket view: it warns, and copies the gradient on every step.
    """
    model.to(memory_format=torch.channels_last)
    conv_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    for param in model.parameters():
        if param.dim() == 4 and id(param) not in conv_weights:
            param.data = param.data.clone(memory_format=torch.contiguous_format)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers;
    checkpoints hold its keys."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
