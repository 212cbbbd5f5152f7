"""Distributed training through torchrun: process group, model wrapping, collectives, state dicts.

``torchrun --nproc_per_node=N tools/train.py ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
:func:`init_distributed` turns them into a process group through timm's
``init_distributed_device_so`` (NCCL on CUDA, gloo on CPU; SLURM variables work too). Without those
variables everything here degrades to a single process and no collective is called.

Model wrapping (:func:`wrap_model`), in the order timm's ``train.py`` uses:

- FSDP2 (``--fsdp``): ``fully_shard`` on every block (elements of containers named ``blocks``),
  then on the root; parameters become sharded DTensors, the optimizer must be built afterwards.
- ``torch.compile`` (``--torchcompile``), on the (sharded) model.
- DDP (when distributed and not FSDP), around the compiled model.

Checkpoints always hold *full* state dicts keyed by parameter name: :func:`full_state` gathers them
with ``torch.distributed.checkpoint.state_dict`` (a no-op gather for single-process and DDP runs,
an all-gather for FSDP), and :func:`load_full_state` scatters them back, so a checkpoint written by
an 8-GPU FSDP run resumes in a single process and vice versa.
"""
import contextlib
import datetime
import gc
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .common import InputError

__all__ = ["DistEnv", "init_distributed", "Wrapped", "wrap_model", "fsdp_units", "full_state",
           "load_full_state", "full_model_state", "load_full_model_state"]


@dataclass
class DistEnv:
    """Where this process runs and who its peers are."""
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    distributed: bool = False

    @property
    def is_primary(self) -> bool:
        """Only the primary process (global rank 0) writes files and logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) of ``tensor`` across ranks, returned on ``tensor``'s device."""
        if not self.distributed:
            return tensor
        # NCCL reduces device tensors only; gloo takes CPU tensors.
        work = tensor.to(self.device) if dist.get_backend() == "nccl" else tensor.cpu()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(tensor.device)

    def max_int(self, value: int) -> int:
        """The largest ``value`` over all ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64,
                         device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather_objects(self, obj: Any) -> List[Any]:
        """Every rank's ``obj`` (pickled), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: List[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def init_distributed(device_name: Optional[str] = None, backend: Optional[str] = None,
                     timeout_min: Optional[float] = None) -> DistEnv:
    """Join (or reuse) the process group torchrun describes in the environment.

    Args:
        device_name: ``cuda``/``cpu``/``cuda:1``; default ``cuda`` when a GPU is visible. Under
            torchrun a CUDA device is replaced by ``cuda:<LOCAL_RANK>``.
        backend: process-group backend; default NCCL for CUDA, gloo for CPU.
        timeout_min: collective timeout (default torch's 10 min for NCCL / 30 min for gloo).

    A process group that already exists (a second call in the same process, e.g. eval after train
    in one script) is reused, never re-created.
    """
    from timm.utils.distributed import init_distributed_device_so, is_distributed_env

    name = device_name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA GPU is visible; use --device cpu")
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if name.startswith("cuda") and world > 1:
            name = f"cuda:{local_rank}"
            torch.cuda.set_device(name)
        return DistEnv(torch.device(name), rank, local_rank, world, world > 1)
    if timeout_min is not None and is_distributed_env():
        # init_distributed_device_so has no timeout argument; pre-create the group it would create.
        dist.init_process_group(backend=backend or ("nccl" if name.startswith("cuda") else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_min))
        return init_distributed(device_name, backend)
    info = init_distributed_device_so(device=name, dist_backend=backend)
    return DistEnv(torch.device(info["device"]), info["global_rank"], info["local_rank"], info["world_size"],
                   info["distributed"])


@dataclass
class Wrapped:
    """A model prepared for training.

    Attributes:
        train: the module forward/backward goes through (DDP ∘ compile ∘ model, ...).
        eval: the module for evaluation: without the DDP wrapper (no collectives, so ranks may see
            different batch counts), with compile. For FSDP it is the sharded model, whose forward
            all-gathers parameters: every rank must run the same number of forwards
            (``eval_needs_lockstep``).
        bare: the model itself (after ``fully_shard`` for FSDP), holding the parameters the
            optimizer updates; checkpoints are taken from it.
        kind: ``"single"``, ``"ddp"`` or ``"fsdp"``.
    """
    train: nn.Module
    eval: nn.Module
    bare: nn.Module
    kind: str

    @property
    def eval_needs_lockstep(self) -> bool:
        return self.kind == "fsdp"

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool) -> Iterator[None]:
        """Gradient all-reduce on (the last micro-batch of an update) or off (the ones before)."""
        if enabled or self.kind == "single":
            yield
        elif self.kind == "ddp":
            with self.train.no_sync():
                yield
        else:
            self.bare.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.bare.set_requires_gradient_sync(True)


def fsdp_units(model: nn.Module) -> List[nn.Module]:
    """Submodules that get their own ``fully_shard`` call: every element of a ``blocks`` container
    (LinViT, timm ViT/Swin/PVT stages), else every element of ``stages``/``layers``."""
    for names in (("blocks",), ("stages", "layers")):
        units = [child for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] in names
                 and isinstance(mod, (nn.ModuleList, nn.Sequential)) for child in mod]
        if units:
            return units
    return []


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False, compile_mode: Optional[str] = None,
               compile_backend: str = "inductor", broadcast_buffers: bool = True,
               extra_fsdp: Tuple[nn.Module, ...] = ()) -> Wrapped:
    """Shard (FSDP2) or replicate (DDP) ``model`` across ranks and optionally compile it.

    Args:
        model: on ``env.device`` already.
        fsdp: FSDP2 instead of DDP (only when distributed; ignored in a single process).
        compile_mode: ``None`` = no ``torch.compile``; otherwise its ``mode`` (``"default"``,
            ``"reduce-overhead"``, ``"max-autotune"``...).
        extra_fsdp: other copies of the model to shard the same way (the EMA), so that their
            state dicts line up tensor by tensor with the model's.
    """
    kind = "single"
    if env.distributed and fsdp:
        from torch.distributed.fsdp import fully_shard
        for m in (model,) + tuple(extra_fsdp):
            # FSDP2 shards contiguous parameters only; channels_last conv weights (the LinViT
            # family's own layout) go back to the default layout first.
            for param in m.parameters():
                if not param.is_contiguous():
                    param.data = param.data.contiguous()
            for unit in fsdp_units(m):
                fully_shard(unit)
            fully_shard(m)
        kind = "fsdp"
    bare = model
    if compile_mode is not None:
        model = torch.compile(model, backend=compile_backend, mode=None if compile_mode == "default" else compile_mode)
    eval_model = model
    if env.distributed and not fsdp:
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [env.device.index if env.device.index is not None else env.local_rank] \
            if env.device.type == "cuda" else None
        # torch 2.14 renamed the per-forward buffer broadcast (the old name warns). Under the new name
        # buffers are still synced once at construction, which a run from one seed or checkpoint wants.
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            buffer_sync = {"forward_sync_buffers": broadcast_buffers}
        else:
            buffer_sync = {"broadcast_buffers": broadcast_buffers}
        model = DistributedDataParallel(model, device_ids=device_ids, **buffer_sync)
        kind = "ddp"
    return Wrapped(train=model, eval=eval_model, bare=bare, kind=kind)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_state(bare: nn.Module, optimizer: torch.optim.Optimizer) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Full model and optimizer state dicts (optimizer state keyed by parameter name), on CPU.

    A collective under FSDP: every rank must call it; only rank 0 receives the tensors."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    return get_state_dict(bare, optimizer, options=_options(cpu_offload=True))


def load_full_state(bare: nn.Module, optimizer: Optional[torch.optim.Optimizer], model_state: Dict[str, Any],
                    optim_state: Optional[Dict[str, Any]]) -> None:
    """Inverse of :func:`full_state`; every rank passes the full dicts (read from the file)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict
    if optimizer is None or optim_state is None:
        set_model_state_dict(bare, model_state, options=_options(strict=True))
    else:
        set_state_dict(bare, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=_options(strict=True))


def full_model_state(module: nn.Module) -> Dict[str, torch.Tensor]:
    """Full state dict of a (possibly sharded) module, on CPU; a collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_options(cpu_offload=True))


def load_full_model_state(module: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, state, options=_options(strict=True))


def run_then_destroy_process_group(main: Callable[[], Any]) -> Any:
    """Run a tool's ``main`` and always tear down the process group it may have started, so a
    torchrun worker that fails does not leave its peers waiting on a collective."""
    try:
        return main()
    finally:
        if dist.is_available() and dist.is_initialized():
            # Free unreachable wrappers (FSDP/DDP state in reference cycles) while the interpreter is
            # whole: a gloo group they keep alive is otherwise torn down during interpreter exit, when
            # its worker threads can no longer take the GIL (seen as SIGABRT after a finished run).
            gc.collect()
            dist.destroy_process_group()
