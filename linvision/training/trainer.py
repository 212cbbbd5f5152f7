"""A training run over timm's utilities: :func:`train` runs a :class:`Trainer` on a
:class:`~linvision.training.config.TrainConfig`.

What the run calls (timm's, not rewritten): ``create_dataset``/``create_transform``/
``create_loader``/``RepeatAugSampler``/``PrefetchLoader`` (data), ``Mixup`` +
``SoftTargetCrossEntropy``/``BinaryCrossEntropy``/``LabelSmoothingCrossEntropy`` (losses),
``create_optimizer_v2`` (weight-decay groups from ``no_weight_decay``, layer decay from
``group_matcher``), ``create_scheduler_v2`` (warmup + cosine...), ``ModelEmaV3``, ``NativeScaler``,
``dispatch_clip_grad``, ``distribute_bn``, ``init_distributed_device_so``, ``update_summary``.
The parts around them live beside this module (resumable sampler, DDP/FSDP2 wrapping, checkpoint
sets with manifests, CSV/TensorBoard monitor).

The steps of a run are the trainer's methods: setup (``__init__``: data, model, EMA, wrapping,
optimizer, schedule), :meth:`Trainer.resume`, then per epoch :meth:`Trainer.train_epoch`,
:meth:`Trainer.validate` and :meth:`Trainer.end_epoch` (best weights, summary row,
:meth:`Trainer.save`), and :meth:`Trainer.finish`.

Under ``torchrun --nproc_per_node=N`` every rank trains on its share of each epoch
(``DistributedSampler`` or ``RepeatAugSampler``), metrics are summed over ranks, and only rank 0
writes files and logs. Output directory (``--output``)::

    config.yaml        the resolved settings (``tools/train.py -c`` reads it back)
    log.txt            the log lines
    summary.csv        one row per epoch (train loss, img/s, val/EMA top-1/top-5, lr, peak memory)
    run_summary.json   best top-1, time, images/s, peak memory of the finished run
    checkpoints/       the last ``--keep-last`` checkpoint sets (step-N.{safetensors,ema.safetensors,state.pth,json})
    last.safetensors, last.ema.safetensors, last_state.pth, last.json   the newest set (hard links)
    best.safetensors   weights (model or EMA, whichever scored) with the best ``--eval-metric`` (top-1)
    args.yaml, model_best.safetensors   timm's names: the arguments, a hard link to best.safetensors

SIGTERM/SIGUSR1 finish the step in progress, write a checkpoint set and return with
``preempted=True`` (:mod:`linvision.training.preemption`).

Resuming (``--resume auto``) restores weights, EMA, optimizer, scheduler position, loss scaler,
counters and every rank's RNG states, and continues at the exact batch where the checkpoint was
taken (mid-epoch checkpoints come from ``--save-every-steps``). On CPU with the same settings the
resumed run ends with bit-identical weights to an uninterrupted one (tested); see
:mod:`linvision.training.data` for why the data order and augmentations allow that.
"""
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

import timm
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3, NativeScaler, distribute_bn, random_seed

from ..checkpoint import atomic_link, capture_rng_state, restore_rng_state, write_json
from .checkpoint_sets import BEST_WEIGHTS, LAST_MANIFEST, LAST_WEIGHTS, Checkpoint, CheckpointManager, resolve_resume
from .common import InputError, plain
from .config import TrainConfig, save_config
from .data import (build_eval_loader, build_train_loader, create_datasets, create_mixup, load_class_map,
                   resolve_num_classes, set_loader_epoch, source_kwargs, train_sampler)
from .distributed import (DistEnv, full_model_state, full_state, init_distributed, load_full_model_state,
                          load_full_state, wrap_model)
from .loop import evaluate, format_time, train_one_epoch
from .model import (build_model, compile_settings, load_weights_file, resolve_amp_dtype, resolve_data_config,
                    to_channels_last)
from .monitor import RunMonitor, peak_memory_mb
from .preemption import PreemptionHandler

__all__ = ["train", "Trainer", "resolve_lr", "build_train_loss", "check_distributed_options", "CONFIG_FILE",
           "RUN_SUMMARY", "TIMM_ARGS_FILE", "TIMM_BEST_ALIAS", "WEIGHTS_DATA_KEYS"]

CONFIG_FILE = "config.yaml"
RUN_SUMMARY = "run_summary.json"
# timm train.py's names, written beside linvision's own: its arguments file, and the best weights
# under timm's stem (a hard link to best.safetensors, no second copy).
TIMM_ARGS_FILE = "args.yaml"
TIMM_BEST_ALIAS = "model_best.safetensors"
# Preprocessing stored in every weights file, so that eval rebuilds the same input from the file alone.
WEIGHTS_DATA_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


# ----------------------------------------------------------------------------------------------
# Optimisation settings

def resolve_lr(cfg: TrainConfig, global_batch: int) -> float:
    """``--lr`` if given, else ``--lr-base`` × (global batch / ``--lr-base-size``), scaled linearly
    (MAViT/RAVLT/DeiT rule) or by the square root (``--lr-base-scale sqrt``).

    The global batch counts every rank and every accumulated micro-batch of one update."""
    if cfg.lr is not None:
        return float(cfg.lr)
    ratio = global_batch / cfg.lr_base_size
    scale = cfg.lr_base_scale
    if not scale:  # timm's automatic choice
        scale = "sqrt" if any(o in str(cfg.opt).lower() for o in ("ada", "lamb")) else "linear"
    if scale == "sqrt":
        ratio = ratio ** 0.5
    return float(cfg.lr_base) * ratio


def build_train_loss(cfg: TrainConfig, mixup_active: bool) -> nn.Module:
    """timm train.py's choice: soft-target CE (or BCE) on mixup targets, else label-smoothing CE
    (or BCE with smoothing), else plain CE."""
    bce_kw = dict(target_threshold=cfg.bce_target_thresh, sum_classes=cfg.bce_sum, pos_weight=cfg.bce_pos_weight)
    if mixup_active:
        return BinaryCrossEntropy(**bce_kw) if cfg.bce_loss else SoftTargetCrossEntropy()
    if cfg.bce_loss:
        return BinaryCrossEntropy(smoothing=cfg.smoothing, **bce_kw)
    return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing) if cfg.smoothing else nn.CrossEntropyLoss()


def _optimizer_kwargs(cfg: TrainConfig, lr: float) -> Dict[str, Any]:
    """``create_optimizer_v2`` arguments: timm's reading of its flags, at the resolved ``lr``."""
    kwargs = optimizer_kwargs(cfg=replace(cfg, lr=lr))
    if cfg.opt_betas:
        kwargs["betas"] = tuple(cfg.opt_betas)
    kwargs.update(cfg.opt_kwargs or {})
    return kwargs


def check_distributed_options(cfg: TrainConfig, env: DistEnv) -> None:
    """Refuse, before any work, the option combinations PyTorch cannot run, saying what to use instead.

    Every rank reaches the same verdict, so under torchrun all of them exit with the message.
    """
    if env.distributed and cfg.sync_bn and env.device.type != "cuda":
        raise InputError("--sync-bn needs CUDA devices: PyTorch's SyncBatchNorm has no CPU implementation. "
                         "Without it, BatchNorm statistics are averaged over the ranks at each epoch end "
                         "(--dist-bn reduce, the default)")
    if env.distributed and cfg.fsdp and cfg.clip_grad and cfg.clip_mode == "agc":
        raise InputError("--clip-mode agc does not run under --fsdp: timm's adaptive clipping changes the "
                         "sharded gradient norms in place. Use --clip-mode norm or value, or DDP (no --fsdp)")


# ----------------------------------------------------------------------------------------------
# The run

class _Preempted(Exception):
    """Raised from the update hook after the preemption checkpoint: unwinds the epoch loop."""

    def __init__(self, epoch: int, batches_done: int):
        super().__init__(f"preempted at epoch {epoch}, batch {batches_done}")
        self.epoch, self.batches_done = epoch, batches_done


def _improves(value: Optional[float], best: Optional[float], metric: str) -> bool:
    if value is None:
        return False
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def _epoch_line(epoch: int, epochs: int, train_m: Mapping[str, float], val_m: Optional[Mapping[str, float]],
                ema_m: Optional[Mapping[str, float]]) -> str:
    line = f"epoch {epoch + 1}/{epochs}  train loss {train_m['loss']:.4f}  "
    if val_m is not None:
        line += f"val loss {val_m['loss']:.4f} top-1 {val_m['top1']:.2f} top-5 {val_m['top5']:.2f}  "
    if ema_m is not None:
        line += f"ema top-1 {ema_m['top1']:.2f} top-5 {ema_m['top5']:.2f}  "
    extra = (val_m or {}).get("time", 0.0) + (ema_m or {}).get("time", 0.0)
    return line + (f"lr {train_m['lr']:.2e}  {train_m['img_per_sec']:.0f} img/s  "
                   f"time {train_m['time'] + extra:.1f}s")


def _ema_generator(model_ema: Optional[ModelEmaV3]) -> Optional[torch.Generator]:
    return getattr(model_ema, "_sr_generator", None) if model_ema is not None else None


class Trainer:
    """One training run of ``cfg``: ``__init__`` sets everything up, :meth:`run` trains.

    Args:
        cfg: the run's settings.
        log: console printer (rank 0 only).
        settings: the resolved settings saved as ``config.yaml`` / ``args.yaml`` and in every
            training state (default: ``cfg.to_dict()``; the command line adds its refused timm
            flags at their defaults).
    """

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print,
                 settings: Optional[Mapping[str, Any]] = None):
        self.run_start = time.perf_counter()
        if cfg.in_chans is None:
            cfg = replace(cfg, in_chans=cfg.input_size[0] if cfg.input_size else 3)
        self.cfg = cfg
        self.settings = plain(dict(settings)) if settings is not None else cfg.to_dict()
        self.env = env = init_distributed(cfg.device, cfg.dist_backend)
        self.device = device = env.device
        self.amp_dtype = resolve_amp_dtype(cfg.amp, device, cfg.amp_dtype)
        check_distributed_options(cfg, env)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark = False
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        # The same initial weights on every rank (FSDP shards each rank's own copy); data order,
        # augmentation and drop path then draw from per-rank streams.
        random_seed(cfg.seed, 0)
        self.output = Path(cfg.output)
        self.monitor = RunMonitor(self.output, enabled=env.is_primary, tensorboard=cfg.tensorboard, echo=log)
        self.say = say = self.monitor.log

        # Data and model
        self.datasets, class_to_idx = create_datasets(
            cfg.data_dir, ("train", "val"), in_chans=cfg.in_chans, dataset=cfg.dataset,
            download=cfg.dataset_download, batch_size=cfg.batch_size, seed=cfg.seed,
            class_map=load_class_map(cfg.class_map),
            source_kwargs=source_kwargs(cfg.input_key, cfg.target_key, cfg.dataset_trust_remote_code),
            split_names={"train": cfg.train_split, "val": cfg.val_split},
            num_samples={"train": cfg.train_num_samples, "val": cfg.val_num_samples})
        self.num_classes = num_classes = resolve_num_classes(cfg.num_classes, class_to_idx)
        spec = cfg.model_spec()
        if cfg.initial_checkpoint:
            model = load_weights_file(spec, cfg.initial_checkpoint, num_classes, what="--initial-checkpoint")
            say(f"initial weights from {cfg.initial_checkpoint}")
        elif cfg.pretrained_path:
            model = load_weights_file(spec, cfg.pretrained_path, num_classes, what="--pretrained-path",
                                      pretrained_semantics=True)
            say(f"pretrained weights from {cfg.pretrained_path}")
        else:
            model = build_model(spec, num_classes)
        if cfg.grad_checkpointing:
            model.set_grad_checkpointing(True)
        random_seed(cfg.seed, env.rank)
        self.data_config = data_config = resolve_data_config(cfg.data_overrides(), model)
        model.to(device)
        self.fsdp = fsdp = cfg.fsdp and env.distributed
        if cfg.channels_last and not fsdp:
            # FSDP2 shards only contiguous parameters: under it the weights stay as they are and only the
            # batches go channels_last (convolutions then run channels_last all the same).
            to_channels_last(model)
        if env.distributed and cfg.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.accum = max(1, int(cfg.grad_accum_steps))
        self.global_batch = cfg.batch_size * env.world_size * self.accum
        self.model_ema = None
        if cfg.model_ema:
            decay = float(cfg.model_ema_decay)
            if cfg.model_ema_decay_base_size:
                decay = decay ** (self.global_batch / cfg.model_ema_decay_base_size)
            # Under FSDP parameters are DTensors but buffers plain tensors, which one foreach call
            # cannot mix: update tensor by tensor there.
            self.model_ema = ModelEmaV3(model, decay=decay, warmup_power=3 / 4, foreach=not fsdp,
                                        use_warmup=cfg.model_ema_warmup)
        self.compile_mode, compile_backend = compile_settings(cfg.torchcompile, cfg.torchcompile_mode)
        self.w = wrap_model(model, env, fsdp=fsdp, compile_mode=self.compile_mode, compile_backend=compile_backend,
                            broadcast_buffers=not cfg.no_ddp_bb,
                            extra_fsdp=(self.model_ema.module,) if (fsdp and self.model_ema is not None) else ())

        # Optimisation
        if cfg.fsdp and not env.distributed:
            say("note: --fsdp needs several processes (torchrun); training unsharded")
        if fsdp and self.amp_dtype == torch.float16:
            say("warning: --fsdp with float16 uses the plain GradScaler, whose overflow check is per rank "
                "(untested); prefer --amp-dtype bfloat16")
        self.lr = resolve_lr(cfg, self.global_batch)
        self.optimizer = create_optimizer_v2(self.w.bare, **_optimizer_kwargs(cfg, self.lr))
        self.scaler = NativeScaler(device=device.type) if self.amp_dtype == torch.float16 else None
        self.train_loader = build_train_loader(self.datasets["train"], data_config, cfg, env)
        self.val_loader = build_eval_loader(self.datasets["val"], data_config, cfg.val_batch_size or 2 * cfg.batch_size,
                                            env, workers=cfg.workers, pin_mem=cfg.pin_mem, prefetcher=cfg.prefetcher)
        if len(self.train_loader) == 0:
            raise InputError(f"{cfg.data_dir}: the train split gives no batches")
        self.updates_per_epoch = math.ceil(len(self.train_loader) / self.accum)
        if str(cfg.sched).lower() == "plateau":
            raise InputError("--sched plateau is not supported: the loop sets the schedule from the update count "
                             "(exact resume), which a metric-driven schedule cannot follow; use cosine, step, multistep...")
        # timm's own translation of the flags; unset values (None) fall back to create_scheduler_v2's
        # defaults (timm <= 1.0.29 also fails on an explicit decay_epochs=None).
        sched_kwargs = {k: v for k, v in scheduler_kwargs(cfg).items() if v is not None}
        self.scheduler, self.num_epochs = create_scheduler_v2(self.optimizer, **sched_kwargs,
                                                              updates_per_epoch=self.updates_per_epoch)
        self.mixup_fn = create_mixup(cfg, num_classes)
        self.loss_fn = build_train_loss(cfg, self.mixup_fn is not None).to(device)
        self.sampler = train_sampler(self.train_loader)
        meta = {"model": cfg.model, "num_classes": num_classes, "in_chans": data_config["input_size"][0],
                "model_kwargs": cfg.model_kwargs or {},
                "classes": sorted(class_to_idx, key=class_to_idx.get) if class_to_idx else None}
        meta.update({k: data_config[k] for k in WEIGHTS_DATA_KEYS})
        self.weights_meta = plain(meta)
        self.manager = CheckpointManager(self.output, keep_last=cfg.keep_last, log=say)
        self.preempt = PreemptionHandler(env)

        # Position: a fresh run, until resume() finds a checkpoint.
        self.start_epoch = self.start_batch = self.num_updates = 0
        self.epoch = 0
        self.metric = cfg.eval_metric
        self.best: Dict[str, Any] = {"top1": None, "epoch": None, "source": None, "metric": self.metric, "value": None}
        self.history: List[Dict[str, Any]] = []
        self.session: List[Dict[str, Any]] = []  # this process's epochs (the history includes resumed ones)
        self.resume_meter: Optional[Dict[str, float]] = None
        self.last_saved: Optional[Path] = None
        self.last_val: Optional[Dict[str, float]] = None
        self.last_ema: Optional[Dict[str, float]] = None

    # ---------------------------------------------------------------- resume
    def resume(self) -> None:
        """Continue from ``--resume`` (rank 0 picks and verifies the set, every rank loads it), and
        apply ``--start-epoch``; then set the schedule to the update count."""
        cfg, env, say = self.cfg, self.env, self.say
        found, problem = None, None
        if env.is_primary:  # rank 0 verifies (sha256) and tells the others which set to load
            try:
                found = resolve_resume(cfg.resume, self.output, log=say, keep_last=self.manager.keep_last)
            except InputError as e:
                problem = str(e)
        found_path, problem = env.broadcast_object((str(found.path) if found is not None else None, problem))
        if problem is not None:
            raise InputError(problem)
        if found_path is not None:
            ckpt = found if env.is_primary else resolve_resume(found_path, self.output, log=say, check_hash=False)
            state, best = self._load(ckpt)
            self.start_epoch, self.start_batch = state["next_epoch"], state["batches_done"]
            self.num_updates = state["num_updates"]
            self.best, self.history = dict(best), list(state.get("history") or [])
            if self.best.get("metric", "top1") != self.metric:  # another --eval-metric than the checkpoint's run
                self.best.update(top1=None, epoch=None, source=None, value=None)
            self.best.update(metric=self.metric, value=self.best.get("value", self.best["top1"]))
            self.resume_meter = state.get("epoch_progress")
            if env.is_primary:
                self.manager.discard_newer(self.num_updates)
            if self.start_batch and (state.get("world_size", env.world_size) != env.world_size
                                     or state.get("global_batch", self.global_batch) != self.global_batch):
                say(f"warning: the checkpoint was taken with {state.get('world_size')} processes and global batch "
                    f"{state.get('global_batch')}, this run has {env.world_size} and {self.global_batch}: epoch "
                    f"{self.start_epoch + 1} continues after {self.start_batch} batches but in a different sample "
                    f"order")
            say(f"resumed from {ckpt.path} at epoch {self.start_epoch + 1}/{self.num_epochs}"
                + (f", batch {self.start_batch}/{len(self.train_loader)}" if self.start_batch else "")
                + f" ({self.num_updates} updates done)")
        if cfg.start_epoch is not None:
            # timm's --start-epoch: wins over the resumed position; the schedule follows the epoch.
            self.start_epoch, self.start_batch, self.resume_meter = int(cfg.start_epoch), 0, None
            self.num_updates = self.start_epoch * self.updates_per_epoch
            say(f"--start-epoch: starting at epoch {self.start_epoch + 1}/{self.num_epochs} "
                f"({self.num_updates} updates)")
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.num_updates)

    def _load(self, ckpt: Checkpoint) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """Load a checkpoint set into the (wrapped) model, EMA, optimizer and scaler; restore this
        rank's RNG states. Returns ``(state, best)`` with the counters normalised to format 2."""
        cfg, env, say = self.cfg, self.env, self.say
        loaded = ckpt.load()
        state = loaded["state"]
        trained_as = (state.get("args") or {}).get("model")
        if (trained_as or "").split(".")[0] != cfg.model.split(".")[0]:
            if not cfg.allow_model_mismatch:
                raise InputError(f"--resume {ckpt.path} was written by model {trained_as!r}, not {cfg.model!r}; "
                                 f"pass --model {trained_as}, or --allow-model-mismatch to load it anyway")
            say(f"warning: --allow-model-mismatch: resuming {cfg.model} from a checkpoint of {trained_as}")
        resume_opt = not cfg.no_resume_opt
        bare = self.w.bare
        if state["format"] == "linvision.train_state/1":  # epoch-end states before manifests
            state.update(next_epoch=state["epoch"] + 1, batches_done=0)
            load_full_state(bare, None, loaded["weights"], None)
            if resume_opt:
                self.optimizer.load_state_dict(state["optimizer"])
        elif resume_opt:
            load_full_state(bare, self.optimizer, loaded["weights"], state["optimizer"])
        else:  # --no-resume-opt: weights and counters only; the optimizer starts afresh
            load_full_state(bare, None, loaded["weights"], None)
        if self.model_ema is not None:
            if loaded["ema"] is not None:
                load_full_model_state(self.model_ema.module, loaded["ema"])
            else:
                say("warning: the checkpoint has no EMA weights; the EMA restarts from the model weights")
                load_full_model_state(self.model_ema.module, loaded["weights"])
            gen = _ema_generator(self.model_ema)
            if gen is not None and state.get("ema_generator") is not None:
                gen.set_state(state["ema_generator"])
        if self.scaler is not None and state.get("scaler") and resume_opt:
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if isinstance(rng, dict):  # format 1: one process
            rng = [rng]
        if len(rng) == env.world_size:
            restore_rng_state(rng[env.rank])
        else:
            say(f"warning: the checkpoint holds RNG states of {len(rng)} processes, this run has {env.world_size}; "
                f"random streams are reseeded")
            random_seed(cfg.seed + state["num_updates"], env.rank)
        best = state.get("best") or {}
        best = {"top1": best.get("top1"), "epoch": best.get("epoch"), "source": best.get("source", "model"),
                "metric": best.get("metric", "top1"), "value": best.get("value", best.get("top1"))}
        return state, best

    # ---------------------------------------------------------------- files and lines before the first epoch
    def announce(self) -> None:
        """Write ``config.yaml`` and timm's ``args.yaml``, start wandb, and log what the run is."""
        cfg, env = self.cfg, self.env
        if env.is_primary:
            save_config(self.settings, self.output / CONFIG_FILE, header=[
                f"resolved config of {cfg.model} (tools/train.py -c reads it back)",
                f"world size {env.world_size}, global batch {self.global_batch}, lr {self.lr:.6g}, "
                f"torch {torch.__version__}, timm {timm.__version__}"])
            # timm's train.py writes its arguments as args.yaml: the same settings under timm's file name.
            save_config(self.settings, self.output / TIMM_ARGS_FILE, header=[
                "the run's arguments under timm's file name (config.yaml holds the same; -c reads either)"])
            self._init_wandb()
        n_params = sum(p.numel() for p in self.model.parameters())
        channels_last = cfg.channels_last
        self.say(
            f"{cfg.model}: {n_params / 1e6:.2f}M params, {self.num_classes} classes, input "
            f"{tuple(self.data_config['input_size'])}, {len(self.datasets['train'])} train / "
            f"{len(self.datasets['val'])} val images, {self.num_epochs} epochs of {len(self.train_loader)} steps, "
            f"{env.world_size} x {self.device}, global batch {self.global_batch}, lr {self.lr:.3g}, "
            f"amp {self.amp_dtype or 'off'}, {self.w.kind}{' + compile' if self.compile_mode else ''}"
            f"{', channels_last' + (' (batches only)' if self.fsdp else '') if channels_last else ''}"
            f"{', ema' if self.model_ema is not None else ''}, output {self.output}")

    def _init_wandb(self) -> None:
        """timm's ``--log-wandb``: a wandb run that receives every ``summary.csv`` row (rank 0 only)."""
        cfg = self.cfg
        if not cfg.log_wandb:
            return
        try:
            import wandb
        except ImportError:
            self.monitor.log("warning: --log-wandb: the wandb package is not installed (pip install wandb); "
                             "metrics go to summary.csv only")
            return
        wandb.init(project=cfg.wandb_project, name=self.output.name, config=self.settings,
                   tags=cfg.wandb_tags or None, resume="must" if cfg.wandb_resume_id else None,
                   id=cfg.wandb_resume_id or None)
        self.monitor.log_wandb = True

    # ---------------------------------------------------------------- save
    def save(self, next_epoch: int, batches_done: int, meter: Optional[Dict[str, float]],
             best_source: Optional[str] = None) -> None:
        """Save one checkpoint set (and ``best.safetensors`` first when ``best_source`` names a new
        best: a crash in between then repeats the epoch rather than leave a stale best file).

        Every rank calls it: under FSDP gathering the state is a collective, and every rank's RNG
        state goes into the set."""
        env, w, model_ema = self.env, self.w, self.model_ema
        model_state = optim_state = ema_state = None
        if w.kind == "fsdp" or env.is_primary:  # a collective under FSDP, a CPU copy otherwise
            model_state, optim_state = full_state(w.bare, self.optimizer)
            ema_state = full_model_state(model_ema.module) if model_ema is not None else None
        rng = env.gather_objects(capture_rng_state())
        if not env.is_primary:
            return
        best = self.best
        if best_source is not None:
            best_file = self.manager.save_best(ema_state if best_source == "ema" else model_state,
                                               dict(self.weights_meta, epoch=next_epoch - 1, top1=best["top1"],
                                                    source=best_source, eval_metric=best["metric"],
                                                    metric_value=best["value"]))
            atomic_link(best_file, self.output / TIMM_BEST_ALIAS)  # where a timm user looks (model_best.pth.tar)
        gen = _ema_generator(model_ema)
        state = {
            "format": "linvision.train_state/2",
            "epoch": next_epoch - 1,  # the last finished epoch (-1: none)
            "next_epoch": next_epoch,
            "batches_done": batches_done,
            "num_updates": self.num_updates,
            "epoch_progress": meter,
            "best": plain(best),
            "history": plain(self.history),
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "ema_generator": gen.get_state() if gen is not None else None,
            "world_size": env.world_size,
            "global_batch": self.global_batch,
            "args": self.settings,
        }
        self.last_saved = self.manager.save(self.num_updates, model_state, state,
                                            dict(self.weights_meta, epoch=next_epoch - 1), ema=ema_state)

    def _on_update(self, batches_done: int, updates: int, meter_fn: Callable[[], Dict[str, float]]) -> None:
        """After every optimizer update: the ``--save-every-steps`` checkpoint, and a stop (after a
        checkpoint) when a preemption signal arrived."""
        self.num_updates = updates
        mid_epoch = batches_done < len(self.train_loader)
        every = self.cfg.save_every_steps
        saved = bool(every and updates % every == 0 and mid_epoch)
        if saved:
            self.save(self.epoch, batches_done, meter_fn())
        if mid_epoch and self.preempt.should_stop(updates):
            if not saved:
                self.save(self.epoch, batches_done, meter_fn())
            raise _Preempted(self.epoch, batches_done)

    # ---------------------------------------------------------------- one epoch
    def train_epoch(self, epoch: int) -> Dict[str, float]:
        """Train epoch ``epoch`` (from the resumed batch in the first one), then sync BatchNorm
        statistics over the ranks. Returns :func:`~linvision.training.loop.train_one_epoch`'s metrics.

        Raises:
            _Preempted: a stop signal arrived; the checkpoint is written.
        """
        cfg, env = self.cfg, self.env
        self.epoch = epoch
        set_loader_epoch(self.train_loader, epoch)
        skip = self.start_batch if epoch == self.start_epoch else 0
        if skip and self.sampler is not None:
            self.sampler.skip(skip * cfg.batch_size)
        if self.scheduler is not None:
            self.scheduler.step(epoch)
        if self.mixup_fn is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            self.mixup_fn.mixup_enabled = False
        train_m = train_one_epoch(
            self.w.train, self.train_loader, self.optimizer, self.loss_fn, self.device, scheduler=self.scheduler,
            num_updates=self.num_updates, amp_dtype=self.amp_dtype, clip_grad=cfg.clip_grad,
            progress=cfg.progress and env.is_primary, desc=f"epoch {epoch + 1}/{self.num_epochs}",
            log_interval=cfg.log_interval, clip_mode=cfg.clip_mode, mixup_fn=self.mixup_fn,
            model_ema=self.model_ema, scaler=self.scaler, grad_accum_steps=self.accum,
            channels_last=cfg.channels_last, wrapped=self.w, env=env, start_batch=skip,
            meter=self.resume_meter if skip else None, on_update=self._on_update, log=self.say,
            synchronize_step=cfg.synchronize_step)
        self.num_updates = train_m["num_updates"]
        if env.distributed and not cfg.sync_bn and cfg.dist_bn in ("reduce", "broadcast"):
            # BatchNorm statistics drift apart per rank; average (or copy rank 0's) once per epoch.
            distribute_bn(self.w.bare, env.world_size, cfg.dist_bn == "reduce")
            if self.model_ema is not None:
                distribute_bn(self.model_ema.module, env.world_size, cfg.dist_bn == "reduce")
        return train_m

    def validate(self, epoch: int) -> Tuple[Optional[Dict[str, float]], Optional[Dict[str, float]]]:
        """``(model metrics, EMA metrics)`` on the val split after ``epoch``; ``None`` where there is no
        EMA, or when ``--eval-interval`` skips this epoch (the last one is always evaluated)."""
        cfg, env = self.cfg, self.env
        interval = cfg.eval_interval
        if not ((interval and (epoch + 1) % interval == 0) or epoch == self.num_epochs - 1):
            return None, None
        progress = cfg.progress and env.is_primary
        lockstep = self.w.eval_needs_lockstep
        val_m = evaluate(self.w.eval, self.val_loader, self.device, self.amp_dtype, progress=progress, env=env,
                         lockstep=lockstep, channels_last=cfg.channels_last)
        ema_m = None
        if self.model_ema is not None:
            ema_m = evaluate(self.model_ema.module, self.val_loader, self.device, self.amp_dtype, desc="val (ema)",
                             progress=progress, env=env, lockstep=lockstep, channels_last=cfg.channels_last)
        return val_m, ema_m

    def end_epoch(self, epoch: int, train_m: Mapping[str, float], val_m: Optional[Dict[str, float]],
                  ema_m: Optional[Dict[str, float]]) -> None:
        """Record the epoch: a new best, the summary row, the epoch-end checkpoint set, the log line."""
        best_source = None
        for source, m in (("model", val_m), ("ema", ema_m)):
            if m is not None and _improves(m[self.metric], self.best["value"], self.metric):
                self.best = {"top1": m["top1"], "epoch": epoch, "source": source, "metric": self.metric,
                             "value": m[self.metric]}
                best_source = source
        peak = peak_memory_mb(self.device)
        row = {"epoch": epoch + 1, "train_loss": train_m["loss"], "img_per_sec": train_m["img_per_sec"],
               "time": train_m["time"], "lr": train_m["lr"], "peak_mem_mb": peak,
               "top1": (val_m or {}).get("top1"), "top5": (val_m or {}).get("top5"),
               "ema_top1": (ema_m or {}).get("top1"), "ema_top5": (ema_m or {}).get("top5")}
        self.history.append(row)
        self.session.append(row)
        self.save(epoch + 1, 0, None, best_source)
        self.monitor.epoch(epoch, train_m, val_m, ema_m, train_m["lr"], peak, self.num_updates)
        self.say(_epoch_line(epoch, self.num_epochs, train_m, val_m, ema_m))
        self.last_val, self.last_ema = val_m, ema_m
        self.resume_meter = None

    # ---------------------------------------------------------------- the whole run
    def run(self) -> Dict[str, Any]:
        """Resume, train the remaining epochs, and finish (or stop on a preemption signal).

        Returns (on every rank): :meth:`finish`'s summary, or :meth:`stopped`'s."""
        self.resume()
        self.announce()
        stopped: Optional[_Preempted] = None
        with self.preempt:
            for epoch in range(self.start_epoch, self.num_epochs):
                try:
                    train_m = self.train_epoch(epoch)
                except _Preempted as e:
                    stopped = e
                    break
                val_m, ema_m = self.validate(epoch)
                self.end_epoch(epoch, train_m, val_m, ema_m)
                if epoch + 1 < self.num_epochs and self.preempt.should_stop():  # a signal during evaluation
                    stopped = _Preempted(epoch + 1, 0)
                    break
        return self.finish() if stopped is None else self.stopped(stopped)

    def stopped(self, where: "_Preempted") -> Dict[str, Any]:
        """Close the run after a preemption checkpoint; says how to continue."""
        env, output = self.env, self.output
        at = f"epoch {where.epoch + 1}, batch {where.batches_done}/{len(self.train_loader)}" if where.batches_done \
            else f"the end of epoch {where.epoch}"
        self.say(f"preempted by {self.preempt.signal_name}: checkpoint {self.last_saved} written at {at} "
                 f"({self.num_updates} updates); rerun the same command with --resume auto to continue")
        self.monitor.close()
        env.barrier()
        return dict(preempted=True, signal=self.preempt.signal_name, checkpoint=self.last_saved, epoch=where.epoch,
                    batches_done=where.batches_done, num_updates=self.num_updates, rank=env.rank,
                    world_size=env.world_size, output=output, best_checkpoint=output / BEST_WEIGHTS,
                    last_checkpoint=output / LAST_WEIGHTS)

    def finish(self) -> Dict[str, Any]:
        """Write ``run_summary.json`` and the closing lines; returns the run's summary."""
        env, output, best, say = self.env, self.output, self.best, self.say
        best_path = output / BEST_WEIGHTS
        total_time = time.perf_counter() - self.run_start
        peak = peak_memory_mb(self.device)
        rates = [r["img_per_sec"] for r in self.session]
        summary = {
            "model": self.cfg.model, "best_top1": best["top1"],
            "best_epoch": None if best["epoch"] is None else best["epoch"] + 1, "best_source": best["source"],
            "best_metric": self.metric, "best_metric_value": best["value"],
            "epochs_run": self.num_epochs - self.start_epoch, "num_updates": self.num_updates, "time": total_time,
            "img_per_sec": float(np.median(rates)) if rates else None, "peak_mem_mb": peak,
            "world_size": env.world_size, "global_batch": self.global_batch, "device": str(self.device),
            "last": self.last_val, "last_ema": self.last_ema, "preempted": False,
        }
        if env.is_primary:
            write_json(plain(dict(summary, history=self.history)), output / RUN_SUMMARY)
            if best["top1"] is not None:
                say(f"best val {self.metric} {best['value']:.4g} (top-1 {best['top1']:.2f}, {best['source']}, "
                    f"epoch {best['epoch'] + 1})")
            say(f"done: {summary['epochs_run']} epochs in {format_time(total_time)}, "
                + (f"{summary['img_per_sec']:.0f} img/s (median epoch, all ranks), " if rates else "")
                + f"peak memory {peak:.0f} MiB ({'CUDA allocated' if self.device.type == 'cuda' else 'RSS'}, rank 0)")
            say(f"files: best weights {best_path} (also {TIMM_BEST_ALIAS}); resumable state {output / LAST_MANIFEST} "
                f"(--resume auto); {len(self.manager.step_manifests())} checkpoint set(s) in {self.manager.dir}")
        self.monitor.close()
        env.barrier()  # nobody reads the output before rank 0 has written it
        return dict(summary, history=self.history, rank=env.rank, output=output, best_checkpoint=best_path,
                    last_checkpoint=output / LAST_WEIGHTS)


def train(cfg: TrainConfig, log: Callable[[str], None] = print,
          settings: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Train ``cfg.model`` and evaluate it (and its EMA) every ``--eval-interval`` epochs.

    Args:
        cfg: the run's settings (field names follow timm's ``train.py`` flags).
        log: console printer (rank 0 only).
        settings: what to save as ``config.yaml`` (see :class:`Trainer`).

    Returns (on every rank):
        ``{"best_top1", "best_epoch" (1-based), "best_source" ("model"/"ema"), "last": val
        metrics of the final epoch, "last_ema", "history": per-epoch rows, "epochs_run",
        "num_updates", "img_per_sec", "time", "peak_mem_mb", "rank", "world_size", "output",
        "best_checkpoint", "last_checkpoint"}``; after a preemption signal ``{"preempted": True,
        "signal", "checkpoint", "epoch", "batches_done", "num_updates", ...}``.
    """
    return Trainer(cfg, log, settings).run()
