"""Evaluating weights on a labelled split: one checkpoint, registry weights or a fresh model
(:func:`evaluate_checkpoint`), many of them in one go (:func:`evaluate_many`, timm ``validate.py``'s
bulk mode), and the results file (:func:`write_results`). Settings come as an
:class:`~linvision.training.config.EvalConfig`.
"""
import csv
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..checkpoint import atomic_write, read_json, read_weights_metadata
from ..serialization import (CheckpointError, check_checkpoint_model, first_line, load_checkpoint_file,
                             unwrap_checkpoint)
from .checkpoint_sets import BEST_WEIGHTS, LAST_WEIGHTS, ema_sibling
from .common import InputError, plain
from .config import EvalConfig
from .data import build_eval_loader, create_datasets, load_class_map, resolve_num_classes, source_kwargs
from .distributed import DistEnv, init_distributed
from .loop import evaluate
from .model import build_model, compile_settings, resolve_amp_dtype, resolve_data_config, to_channels_last

__all__ = ["evaluate_checkpoint", "evaluate_many", "write_results", "RESULT_COLUMNS"]

RESULT_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "loss", "param_count", "img_size", "crop_pct",
                  "interpolation", "img_per_sec", "batch_size", "num_images", "checkpoint", "error")
# Settings a linvision weights file's metadata provides when the command line leaves them unset.
_CHECKPOINT_DEFAULTS = ("model", "num_classes", "in_chans", "model_kwargs", "mean", "std", "crop_pct", "crop_mode",
                        "interpolation")


def _with_checkpoint_defaults(cfg: EvalConfig, meta: Mapping[str, Any]) -> EvalConfig:
    """``cfg`` with the model/input settings the user left unset taken from a linvision weights
    file's metadata."""
    filled = {key: meta[key] for key in _CHECKPOINT_DEFAULTS
              if getattr(cfg, key) in (None, {}) and meta.get(key) is not None}
    if cfg.img_size is None and cfg.input_size is None and meta.get("input_size"):
        filled["input_size"] = list(meta["input_size"])
    return replace(cfg, **filled)


def _checkpoint_file(path: Path) -> Path:
    """The weights file a ``--checkpoint`` names (a manifest names its ``weights``)."""
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if path.name.endswith(("_state.pth", ".state.pth")):
        raise InputError(f"{path} is a training-state file without weights; pass "
                         f"{path.parent / BEST_WEIGHTS} or {path.parent / LAST_WEIGHTS}")
    if path.suffix == ".json":
        try:
            return path.parent / read_json(path)["files"]["weights"]["name"]
        except (OSError, ValueError, KeyError) as e:
            raise InputError(f"{path} is not a linvision checkpoint manifest: {e}") from e
    return path


def _primary_log(env: DistEnv, log: Callable[[str], None]) -> Callable[[str], None]:
    return log if env.is_primary else (lambda message: None)


def evaluate_checkpoint(cfg: EvalConfig, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Evaluate a checkpoint file, pretrained weights or a fresh model on one split.

    Weights: ``cfg.checkpoint`` — a linvision ``.safetensors`` (model name, classes and
    preprocessing come from its metadata; ``--use-ema`` takes the ``.ema.safetensors`` beside it)
    or any other ``.pth``/``.safetensors`` (official checkpoints are converted by the model
    family's ``checkpoint_filter_fn``; ``--use-ema``/``--no-use-ema`` pick the EMA or raw
    entry, default: the family's choice) — or ``cfg.pretrained`` (timm's registry, e.g.
    ``--model mavit_s.<tag> --pretrained``).

    A CUDA out-of-memory error halves the batch size and starts again (down to 1). Under torchrun
    every rank evaluates a share and the metrics are summed.

    Returns:
        :func:`~linvision.training.loop.evaluate`'s metrics plus ``"checkpoint"``, ``"weights"``
        (the file used), ``"model"``, ``"batch_size"`` (the one that fitted), ``"param_count"``
        (millions), ``"img_size"``, ``"crop_pct"`` and ``"interpolation"``.
    """
    env = init_distributed(cfg.device, cfg.dist_backend)
    device = env.device
    log = _primary_log(env, log)
    meta: Dict[str, Any] = {}
    weights_file: Optional[Path] = None
    use_ema = cfg.use_ema
    checkpoint: Any = None
    if cfg.checkpoint:
        weights_file = _checkpoint_file(Path(cfg.checkpoint))
        if use_ema and weights_file.name.endswith(".safetensors"):
            sibling = ema_sibling(weights_file)
            if sibling.is_file():
                weights_file = sibling
        # Read (and check against any manifest) before anything else: a damaged or unsafe file is
        # reported as such, never as a missing option.
        try:
            checkpoint = load_checkpoint_file(weights_file)
        except CheckpointError as e:
            raise InputError(str(e)) from None
        meta = read_weights_metadata(weights_file) if weights_file.name.endswith(".safetensors") else {}
        if cfg.model:
            try:
                check_checkpoint_model(weights_file, cfg.model, allow=cfg.allow_model_mismatch)
            except CheckpointError as e:
                raise InputError(str(e)) from None
        cfg = _with_checkpoint_defaults(cfg, meta)
        if meta and use_ema and not meta.get("ema"):
            log(f"warning: --use-ema: no EMA weights beside {weights_file} ({ema_sibling(weights_file).name}); "
                f"using the file given")
    if not cfg.model:
        raise InputError("--model is required (the checkpoint does not name its model)")
    if not cfg.checkpoint and not cfg.pretrained:
        log("warning: neither --checkpoint nor --pretrained given: evaluating randomly initialised weights")

    amp_dtype = resolve_amp_dtype(cfg.amp, device, cfg.amp_dtype)
    in_chans = cfg.in_chans or (cfg.input_size[0] if cfg.input_size else 3)
    cfg = replace(cfg, in_chans=in_chans)
    class_map = {c: i for i, c in enumerate(meta["classes"])} if meta.get("classes") else load_class_map(cfg.class_map)
    split = cfg.split
    datasets, class_to_idx = create_datasets(
        cfg.data_dir, ("val",), in_chans=in_chans, class_map=class_map, allow_root=True,
        dataset=cfg.dataset, split_names={"val": split}, training_splits=(),
        batch_size=cfg.batch_size, num_samples={"val": cfg.num_samples}, download=cfg.dataset_download,
        source_kwargs=source_kwargs(cfg.input_key, cfg.target_key, cfg.dataset_trust_remote_code))
    num_classes = resolve_num_classes(cfg.num_classes, class_to_idx)
    spec = cfg.model_spec()
    if weights_file is not None and meta:
        model = build_model(spec, num_classes, pretrained=False)
        try:
            model.load_state_dict(checkpoint, strict=True)
        except RuntimeError as e:
            raise InputError(f"{weights_file} does not fit {cfg.model} with {num_classes} classes and "
                             f"{in_chans} input channels:\n{e}") from e
    elif weights_file is not None:
        try:
            # The whole container goes to the family's filter (its documented raw/EMA default)
            # unless --use-ema / --no-use-ema chose.
            if use_ema is not None and isinstance(checkpoint, dict):
                checkpoint = unwrap_checkpoint(checkpoint, prefer_ema=use_ema)
            model = build_model(spec, num_classes, pretrained=True, pretrained_cfg_overlay=dict(
                state_dict=checkpoint, num_classes=num_classes))
        except (RuntimeError, KeyError, ValueError) as e:
            raise InputError(f"{weights_file} does not fit {cfg.model} with {num_classes} classes and "
                             f"{in_chans} input channels:\n{e}") from e
    else:
        model = build_model(spec, num_classes)
    if cfg.reparam:
        from timm.utils.model import reparameterize_model
        model = reparameterize_model(model)
    model.to(device)
    channels_last = cfg.channels_last
    if channels_last:
        to_channels_last(model)
    data_config = resolve_data_config(cfg.data_overrides(), model, use_test_size=not cfg.use_train_size)
    compile_mode, compile_backend = compile_settings(cfg.torchcompile, cfg.torchcompile_mode)
    run_model = model if compile_mode is None else torch.compile(
        model, backend=compile_backend, mode=None if compile_mode == "default" else compile_mode)

    batch_size = cfg.batch_size
    while True:
        loader = build_eval_loader(datasets["val"], data_config, batch_size, env, workers=cfg.workers,
                                   pin_mem=cfg.pin_mem, prefetcher=cfg.prefetcher,
                                   crop_border_pixels=cfg.crop_border_pixels)
        try:
            metrics = evaluate(run_model, loader, device, amp_dtype, progress=cfg.progress and env.is_primary,
                               env=env, channels_last=channels_last)
            break
        except torch.OutOfMemoryError:
            if batch_size == 1:
                raise
            del loader
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"warning: rank {env.rank}: out of memory at batch size {batch_size}; retrying with "
                  f"{batch_size // 2}", flush=True)
            batch_size //= 2
    source = str(cfg.checkpoint) if cfg.checkpoint else f"pretrained {cfg.model}" if cfg.pretrained else "random init"
    used = str(weights_file) if weights_file is not None else source
    log(f"{cfg.model} on {metrics['num_images']} images ({split}): top-1 {metrics['top1']:.2f}  "
        f"top-5 {metrics['top5']:.2f}  loss {metrics['loss']:.4f}  {metrics['img_per_sec']:.0f} img/s  "
        f"checkpoint {source}" + (f" (weights {Path(used).name})" if weights_file is not None and used != source else ""))
    log(f"throughput: {metrics['img_per_sec']:.1f} img/s end to end (data loading included) at batch size "
        f"{batch_size} x {env.world_size} process(es) on {device}, amp {amp_dtype or 'off'}"
        f"{', channels_last' if channels_last else ''}{', compiled' if run_model is not model else ''}")
    return dict(metrics, checkpoint=source, weights=used, model=cfg.model, batch_size=batch_size,
                param_count=round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
                img_size=data_config["input_size"][-1], crop_pct=data_config["crop_pct"],
                interpolation=data_config["interpolation"])


def evaluate_many(cfg: EvalConfig, jobs: Sequence[Tuple[Optional[str], Optional[str]]],
                  log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """timm ``validate.py``'s bulk mode: :func:`evaluate_checkpoint` for every ``(model, checkpoint)``.

    ``model`` ``None`` takes the name from the checkpoint; ``checkpoint`` ``None`` evaluates the
    model's pretrained weights when ``cfg.pretrained``, else its random initialisation. A job that
    fails (unknown model, unreadable file, weights that do not fit) gets a row with ``error`` and
    the others go on.

    Returns:
        Rows with :data:`RESULT_COLUMNS`, sorted by top-1 (best first), failed ones last.
    """
    rows = []
    for model_name, checkpoint in jobs:
        label = " ".join(x for x in (model_name, checkpoint) if x)
        try:
            r = evaluate_checkpoint(replace(cfg, model=model_name, checkpoint=checkpoint), log=log)
        except (InputError, CheckpointError, RuntimeError) as e:
            message = first_line(e)
            log(f"error: {label}: {message}")
            rows.append({"model": model_name, "checkpoint": checkpoint, "error": message})
            continue
        rows.append({"model": r["model"], "top1": r["top1"], "top1_err": round(100 - r["top1"], 4),
                     "top5": r["top5"], "top5_err": round(100 - r["top5"], 4), "loss": round(r["loss"], 6),
                     "param_count": r["param_count"], "img_size": r["img_size"], "crop_pct": r["crop_pct"],
                     "interpolation": r["interpolation"], "img_per_sec": round(r["img_per_sec"], 2),
                     "batch_size": r["batch_size"], "num_images": r["num_images"], "checkpoint": r["weights"]})
    return sorted(rows, key=lambda row: (row.get("top1") is None, -(row.get("top1") or 0.0)))


def write_results(path: os.PathLike, rows: Sequence[Mapping[str, Any]], fmt: str = "csv") -> Path:
    """Write evaluation rows atomically as CSV (:data:`RESULT_COLUMNS`) or JSON (timm's ``--results-file``)."""
    if fmt == "json":
        text = json.dumps([plain(dict(r)) for r in rows], indent=2) + "\n"
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: r.get(k) for k in RESULT_COLUMNS})
        text = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)
    return atomic_write(path, write)
