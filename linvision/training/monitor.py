"""What a run reports: console/log-file lines, the per-epoch CSV, optional TensorBoard, memory.

Only the primary process (rank 0) writes; on other ranks every method is a no-op.

``summary.csv`` columns (one row per epoch, timm's ``update_summary`` format, fixed columns so
that epochs without evaluation leave cells empty): ``epoch`` (1-based), ``train_loss``,
``train_img_per_sec`` (all ranks together), ``train_time`` (s), ``train_peak_mem_mb`` (rank 0),
``eval_loss``, ``eval_top1``, ``eval_top5``, ``eval_ema_loss``, ``eval_ema_top1``,
``eval_ema_top5``, ``lr``.
TensorBoard (``--tensorboard``) gets the same scalars when ``tensorboard`` is installed; it is
never required.
"""
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch

from timm.utils import update_summary

__all__ = ["RunMonitor", "peak_memory_mb", "SUMMARY", "LOG_FILE", "CSV_COLUMNS"]

SUMMARY = "summary.csv"
LOG_FILE = "log.txt"
CSV_COLUMNS = ("loss", "img_per_sec", "time")
EVAL_COLUMNS = ("loss", "top1", "top5", "ema_loss", "ema_top1", "ema_top5")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process in MiB: allocated CUDA memory on a GPU, else peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


class RunMonitor:
    """Console + ``log.txt`` lines, ``summary.csv`` rows and TensorBoard scalars of one run.

    Args:
        output_dir: the run directory (``None``: console only).
        enabled: False on non-primary ranks.
        tensorboard: write ``<output>/tensorboard`` event files if ``tensorboard`` imports.
        echo: the console printer (``print`` by default; tests pass their own).
    """

    def __init__(self, output_dir: Optional[Path], enabled: bool = True, tensorboard: bool = False,
                 echo: Callable[[str], None] = print):
        self.output = Path(output_dir) if output_dir is not None else None
        self.enabled = enabled
        self.echo = echo
        self.writer = None
        self.log_wandb = False  # set once a wandb run exists (--log-wandb)
        if enabled and self.output is not None:
            self.output.mkdir(parents=True, exist_ok=True)
        if enabled and tensorboard and self.output is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.output / "tensorboard"))
            except ImportError:
                self.log("warning: --tensorboard: the tensorboard package is not installed; logging to CSV only")

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        self.echo(message)
        if self.output is not None:
            with open(self.output / LOG_FILE, "a") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)

    def epoch(self, epoch: int, train_m: Mapping[str, Any], val_m: Optional[Mapping[str, Any]],
              ema_m: Optional[Mapping[str, Any]], lr: float, peak_mem_mb: float, num_updates: int) -> None:
        """One ``summary.csv`` row (``epoch`` 0-based here, 1-based in the file)."""
        if not self.enabled or self.output is None:
            return
        train_row = {k: train_m.get(k) for k in CSV_COLUMNS}
        eval_row = {k: (val_m or {}).get(k) for k in ("loss", "top1", "top5")}
        eval_row.update({f"ema_{k}": (ema_m or {}).get(k) for k in ("loss", "top1", "top5")})
        train_row["peak_mem_mb"] = round(peak_mem_mb, 1)
        update_summary(epoch + 1, train_row, eval_row, str(self.output / SUMMARY), lr=lr, log_wandb=self.log_wandb)
        self.scalars({f"train/{k}": v for k, v in train_row.items()}, epoch + 1)
        self.scalars({f"eval/{k}": v for k, v in eval_row.items()}, epoch + 1)
        self.scalars({"lr": lr, "peak_mem_mb": peak_mem_mb, "num_updates": num_updates}, epoch + 1)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
