"""The two loops of a run: one training epoch (:func:`train_one_epoch`) and one evaluation pass
(:func:`evaluate`), over any loader of ``(images, labels)`` batches and any (wrapped) model.

Both sum their metrics over the ranks of a torchrun job, so every rank returns the same numbers
and they equal a single-process run's.
"""
import math
import time
from typing import Callable, Dict, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

from .data import train_sampler
from .distributed import DistEnv, Wrapped
from .model import autocast, unwrap

__all__ = ["train_one_epoch", "evaluate", "format_time"]


def _lr(optimizer: torch.optim.Optimizer) -> float:
    # The unscaled lr: with --layer-decay the groups carry lr x lr_scale (largest for the head).
    return max(group["lr"] for group in optimizer.param_groups)


def format_time(seconds: float) -> str:
    """``H:MM:SS`` of ``seconds`` (negative: 0)."""
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_one_epoch(
        model: nn.Module,
        loader,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        scheduler=None,
        num_updates: int = 0,
        amp_dtype: Optional[torch.dtype] = None,
        clip_grad: Optional[float] = None,
        progress: bool = True,
        desc: str = "train",
        log_interval: int = 10,
        *,
        clip_mode: str = "norm",
        mixup_fn=None,
        model_ema: Optional[ModelEmaV3] = None,
        scaler: Optional[NativeScaler] = None,
        grad_accum_steps: int = 1,
        channels_last: bool = False,
        wrapped: Optional[Wrapped] = None,
        env: Optional[DistEnv] = None,
        start_batch: int = 0,
        meter: Optional[Mapping[str, float]] = None,
        on_update: Optional[Callable[[int, int, Callable[[], Dict[str, float]]], None]] = None,
        log: Optional[Callable[[str], None]] = None,
        synchronize_step: bool = False,
) -> Dict[str, float]:
    """One pass over ``loader`` (from batch ``start_batch``), one optimizer update every
    ``grad_accum_steps`` batches.

    Args:
        model: the module to train (any wrapper); ignored when ``wrapped`` is given.
        loader: yields ``(images (B, C, H, W) float32, labels (B,) int64)``.
        loss_fn: ``(logits (B, num_classes), targets) -> scalar``; targets are soft after mixup.
        scheduler: timm scheduler; ``step_update(num_updates)`` after every update.
        num_updates: optimizer updates before this batch (the scheduler's and EMA's clock).
        amp_dtype: autocast dtype or None for full precision.
        clip_grad, clip_mode: ``dispatch_clip_grad`` value and mode (norm, value, agc).
        progress: tqdm bar (loss, lr, img/s, ETA); without it a line every ``log_interval``
            steps goes to ``log``.
        mixup_fn: timm ``Mixup`` applied to each batch on the device.
        model_ema: updated after every optimizer update.
        scaler: timm ``NativeScaler`` (fp16), which does backward, unscale+clip and step.
        grad_accum_steps: micro-batches per update; the gradient all-reduce runs on the last one only.
        wrapped: the model as :func:`linvision.training.distributed.wrap_model` prepared it.
        env: ranks to sum the epoch's loss over.
        start_batch: batches of this epoch already done (mid-epoch resume); the loader must
            already start there (map-style) or is advanced here (iterable sources).
        meter: ``{"loss_sum", "seen", "time"}`` of those batches, so the epoch's mean is exact.
        on_update: called after every update with ``(batches_done, num_updates, meter_fn)``
            (``meter_fn()`` returns the running meter); the loop saves checkpoints there.
        synchronize_step: ``torch.cuda.synchronize()`` after every update (timm's
            ``--synchronize-step``, for timing and debugging).

    Returns:
        ``{"loss": mean loss per image over all ranks, "lr", "img_per_sec" (all ranks),
        "time", "num_updates", "num_images"}``.
    """
    w = wrapped or Wrapped(model, model, unwrap(model), "single")
    env = env or DistEnv(device)
    w.train.train()
    num_batches = len(loader)
    accum = max(1, int(grad_accum_steps))
    updates_per_epoch = math.ceil(num_batches / accum)
    last_group = num_batches - (updates_per_epoch - 1) * accum
    meter = dict(meter or {})
    loss_sum = torch.tensor(float(meter.get("loss_sum", 0.0)), device=device, dtype=torch.float64)
    seen, prior_time = int(meter.get("seen", 0)), float(meter.get("time", 0.0))
    params = [p for p in w.bare.parameters() if p.requires_grad]
    start = time.perf_counter()
    bar = tqdm(total=num_batches, initial=start_batch, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True, mininterval=0.5)
    iterator = iter(loader)
    if start_batch and train_sampler(loader) is None:
        for _ in range(start_batch):  # an iterable source cannot seek: re-read the batches done
            next(iterator)

    def running() -> Dict[str, float]:
        return {"loss_sum": loss_sum.item(), "seen": seen, "time": prior_time + time.perf_counter() - start}

    optimizer.zero_grad(set_to_none=True)
    batch_idx = start_batch
    for batch_idx in range(start_batch, num_batches):
        try:
            images, labels = next(iterator)
        except StopIteration:  # an iterable source's length is an estimate
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, labels = mixup_fn(images, labels)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        group = last_group if batch_idx // accum == updates_per_epoch - 1 else accum
        need_update = (batch_idx + 1) % accum == 0 or batch_idx + 1 == num_batches
        with w.grad_sync(need_update):
            with autocast(device, amp_dtype):
                loss = loss_fn(w.train(images), labels)
            scaled = loss / group if group > 1 else loss
            if scaler is not None:
                scaler(scaled, optimizer, clip_grad=clip_grad, clip_mode=clip_mode, parameters=params,
                       need_update=need_update)
            else:
                scaled.backward()
                if need_update:
                    if clip_grad:
                        dispatch_clip_grad(params, clip_grad, mode=clip_mode)
                    optimizer.step()
        loss_sum += loss.detach().double() * images.shape[0]
        seen += images.shape[0]
        if need_update:
            optimizer.zero_grad(set_to_none=True)
            num_updates += 1
            if scheduler is not None:
                scheduler.step_update(num_updates=num_updates)
            if model_ema is not None:
                model_ema.update(w.bare, step=num_updates)
            if synchronize_step and device.type == "cuda":
                torch.cuda.synchronize(device)
            if on_update is not None:
                on_update(batch_idx + 1, num_updates, running)
        bar.update(1)
        done = batch_idx + 1 - start_batch
        # The bar refreshes every 10 steps at most; log lines (no bar) come every log_interval.
        if done % (min(log_interval, 10) if progress else log_interval) == 0 or batch_idx == num_batches - 1:
            mean_loss = loss_sum.item() / max(seen, 1)
            if not np.isfinite(mean_loss):
                raise FloatingPointError(f"{desc}: loss became {mean_loss} at step {batch_idx}; lower --lr "
                                         f"or enable --clip-grad")
            elapsed = time.perf_counter() - start
            rate = done * images.shape[0] * env.world_size / max(elapsed, 1e-9)
            lr = _lr(optimizer)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
            if not progress and log is not None and done % log_interval == 0:
                eta = elapsed / done * (num_batches - batch_idx - 1)
                log(f"  {desc} step {batch_idx + 1}/{num_batches}  loss {mean_loss:.4f}  lr {lr:.2e}  "
                    f"{rate:.0f} img/s  eta {format_time(eta)}")
    bar.close()
    totals = env.sum(torch.stack([loss_sum, torch.tensor(float(seen), device=device, dtype=torch.float64)]))
    elapsed = prior_time + time.perf_counter() - start
    total_seen = int(totals[1].item())
    return {"loss": totals[0].item() / max(total_seen, 1), "lr": _lr(optimizer),
            "img_per_sec": total_seen / max(elapsed, 1e-9), "time": elapsed, "num_updates": num_updates,
            "num_images": total_seen}


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader,
        device: torch.device,
        amp_dtype: Optional[torch.dtype] = None,
        progress: bool = True,
        desc: str = "val",
        *,
        env: Optional[DistEnv] = None,
        lockstep: bool = False,
        channels_last: bool = False,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Under torchrun every rank evaluates its share and the correct counts and loss sums are summed
    over ranks, so the result is the same on every rank and equals a single-process run.

    Args:
        env: ranks to sum over (default: this process only).
        lockstep: every rank runs as many forwards as the rank with the most batches (FSDP, whose
            forward is a collective); the extra ones are discarded.

    Returns:
        ``{"loss", "top1", "top5", "num_images", "img_per_sec", "time"}``; ``img_per_sec``
        covers the whole loop (data loading included) and all ranks. top-5 is top-k with
        k = min(5, num_classes).
    """
    env = env or DistEnv(device)
    model.eval()
    totals = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    num_batches = len(loader)
    steps = env.max_int(num_batches) if lockstep else num_batches
    start = time.perf_counter()
    last = None
    for images, labels in tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True,
                               mininterval=0.5):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(labels[:, None])
        totals += torch.stack([F.cross_entropy(logits, labels, reduction="sum").double(),
                               hits[:, 0].sum().double(), hits.sum().double(),
                               torch.tensor(float(labels.shape[0]), device=device, dtype=torch.float64)])
        last = images[:1]
    for _ in range(steps - num_batches):  # FSDP: keep the other ranks' all-gathers company
        with autocast(device, amp_dtype):
            model(last if last is not None else _dummy_input(loader, device))
    totals = env.sum(totals)
    loss_sum, top1, top5, seen = totals.tolist()
    seen = int(seen)
    elapsed = time.perf_counter() - start
    return {"loss": loss_sum / max(seen, 1), "top1": round(100.0 * top1 / max(seen, 1), 4),
            "top5": round(100.0 * top5 / max(seen, 1), 4), "num_images": seen,
            "img_per_sec": seen / max(elapsed, 1e-9), "time": elapsed}


def _dummy_input(loader, device: torch.device) -> torch.Tensor:
    size = getattr(loader, "input_size", None)
    if size is None:
        ds = loader.dataset
        item = ds[0] if len(ds) else None
        size = tuple(item[0].shape) if item is not None and hasattr(item[0], "shape") else (3, 224, 224)
    return torch.zeros((1, *size), device=device)
