"""Checkpoint sets of a training run: write, keep the last K, find the newest intact one.

Layout of an output directory (every file written atomically, :mod:`linvision.checkpoint`)::

    checkpoints/step-000001250.safetensors      model weights (+ run metadata)
    checkpoints/step-000001250.ema.safetensors  EMA weights (when --model-ema)
    checkpoints/step-000001250.state.pth        optimizer, scheduler, scaler, counters, RNG, args
    checkpoints/step-000001250.json             manifest: size + sha256 of the three, written last
    last.safetensors / last.ema.safetensors / last_state.pth / last.json
                                                hard links to the newest set (no extra copy)
    best.safetensors + best.json                weights (model or EMA) with the best val top-1

A set is named by its optimizer-update count, so a mid-epoch save (``--save-every-steps``) and
the epoch-end save that may fall on the same update share one name; the epoch-end one replaces
it. Before files are replaced the old manifest is removed, so a crash mid-write leaves a set
without manifest, which no lookup accepts.

:meth:`CheckpointManager.find_resumable` walks the sets from the newest, verifies each against
its manifest (size and sha256) and returns the first intact one, warning about every set it skips,
so a truncated or corrupted newest checkpoint falls back to the previous one; when every set is
damaged it raises rather than let the run start over.
"""
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from ..checkpoint import (atomic_link, load_state, load_weights, read_weights_metadata,
                          save_state, save_weights, verify_manifest, write_manifest)
from .common import InputError

__all__ = ["CheckpointManager", "Checkpoint", "resolve_resume", "LAST_WEIGHTS", "LAST_EMA", "LAST_STATE",
           "LAST_MANIFEST", "BEST_WEIGHTS", "BEST_MANIFEST", "CHECKPOINT_DIR", "ema_sibling"]

LAST_WEIGHTS = "last.safetensors"
LAST_EMA = "last.ema.safetensors"
LAST_STATE = "last_state.pth"
LAST_MANIFEST = "last.json"
BEST_WEIGHTS = "best.safetensors"
BEST_MANIFEST = "best.json"
CHECKPOINT_DIR = "checkpoints"

_STEP_RE = re.compile(r"^step-(\d+)\.json$")
# role -> (suffix of a step set, name of the "last" link)
_ROLES = {"weights": (".safetensors", LAST_WEIGHTS), "ema": (".ema.safetensors", LAST_EMA),
          "state": (".state.pth", LAST_STATE)}


def ema_sibling(weights: Path) -> Path:
    """``X.safetensors`` -> ``X.ema.safetensors`` (where a run keeps the EMA beside the model)."""
    weights = Path(weights)
    return weights.with_name(weights.name[:-len(".safetensors")] + ".ema.safetensors")


@dataclass
class Checkpoint:
    """One verified checkpoint set (or a legacy ``last_state.pth`` without manifest)."""
    manifest: Optional[Path]
    files: Dict[str, Path]

    @property
    def path(self) -> Path:
        return self.manifest or self.files["state"]

    def load(self) -> Dict[str, Any]:
        """``{"state": dict, "weights": state dict, "ema": state dict or None}`` (tensors on CPU)."""
        try:
            state = load_state(self.files["state"])
        except Exception as e:  # zip/pickle errors of a damaged file come in many types
            raise InputError(f"cannot read training state {self.files['state']}: {e}") from e
        if not isinstance(state, dict) or not str(state.get("format", "")).startswith("linvision.train_state/"):
            raise InputError(f"{self.files['state']} is not a linvision training-state file")
        return {"state": state, "weights": load_weights(self.files["weights"]),
                "ema": load_weights(self.files["ema"]) if "ema" in self.files else None}


def _legacy(state_path: Path) -> Checkpoint:
    """A ``last_state.pth`` from before manifests (format 1): paired with its weights by epoch."""
    try:
        state = load_state(state_path)
    except Exception as e:
        raise ValueError(f"unreadable {state_path.name}: {e}") from e
    weights = state_path.parent / state.get("weights_file", LAST_WEIGHTS)
    if not weights.is_file():
        raise ValueError(f"{weights.name} is missing")
    if read_weights_metadata(weights).get("epoch") != state.get("epoch"):
        raise ValueError(f"{weights.name} and {state_path.name} are from different epochs")
    return Checkpoint(None, {"weights": weights, "state": state_path})


class CheckpointManager:
    """Writes and finds the checkpoint sets of one output directory.

    Args:
        output_dir: the run's output directory.
        keep_last: step sets kept in ``checkpoints/`` (older ones are deleted after a save);
            at least 1. Two or more leave a fallback when the newest is damaged.
        log: where warnings go.
    """

    def __init__(self, output_dir, keep_last: int = 3, log: Callable[[str], None] = print):
        self.output = Path(output_dir)
        self.dir = self.output / CHECKPOINT_DIR
        self.keep_last = max(1, int(keep_last))
        self.log = log

    # ---------------------------------------------------------------- write
    def save(self, num_updates: int, weights: Mapping[str, torch.Tensor], state: Mapping[str, Any],
             meta: Mapping[str, Any], ema: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
        """Write one set, point the ``last.*`` links at it, prune old sets; returns its manifest."""
        stem = f"step-{num_updates:09d}"
        manifest = self.dir / f"{stem}.json"
        if manifest.exists():
            manifest.unlink()  # the files below are about to change under it
        files = {"weights": save_weights(weights, self.dir / f"{stem}.safetensors", meta)}
        if ema is not None:
            files["ema"] = save_weights(ema, self.dir / f"{stem}.ema.safetensors", dict(meta, ema=True))
        files["state"] = save_state(state, self.dir / f"{stem}.state.pth")
        info = {"num_updates": num_updates, "epoch": state.get("epoch"), "next_epoch": state.get("next_epoch"),
                "batches_done": state.get("batches_done")}
        write_manifest(manifest, files, info)
        self._publish_last(files, info)
        self.prune()
        return manifest

    def _publish_last(self, files: Mapping[str, Path], info: Mapping[str, Any]) -> None:
        last_manifest = self.output / LAST_MANIFEST
        if last_manifest.exists():
            last_manifest.unlink()
        linked = {}
        for role, (_, last_name) in _ROLES.items():
            target = self.output / last_name
            if role in files:
                linked[role] = atomic_link(files[role], target)
            elif target.exists():
                target.unlink()  # an EMA left from an earlier run configuration
        write_manifest(last_manifest, linked, info)

    def save_best(self, weights: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        (self.output / BEST_MANIFEST).unlink(missing_ok=True)
        path = save_weights(weights, self.output / BEST_WEIGHTS, meta)
        write_manifest(self.output / BEST_MANIFEST, {"weights": path}, {"top1": meta.get("top1")})
        return path

    def step_manifests(self) -> List[Path]:
        """Manifests in ``checkpoints/``, newest first."""
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def prune(self) -> None:
        """Delete all but the newest ``keep_last`` sets, and leftovers of sets older than them."""
        manifests = self.step_manifests()
        if len(manifests) <= self.keep_last:
            return
        oldest_kept = int(_STEP_RE.match(manifests[self.keep_last - 1].name).group(1))
        for m in manifests[self.keep_last:]:
            m.unlink(missing_ok=True)  # manifest first: a half-deleted set is never "valid"
        for p in list(self.dir.iterdir()):
            step = re.match(r"^step-(\d+)\.", p.name)
            if step and int(step.group(1)) < oldest_kept:
                p.unlink(missing_ok=True)

    def discard_newer(self, num_updates: int) -> None:
        """Delete the sets written after update ``num_updates``: a run resumed from an earlier
        set starts a new history, and the abandoned sets must not be mistaken for its newest."""
        for manifest in self.step_manifests():
            step = int(_STEP_RE.match(manifest.name).group(1))
            if step <= num_updates:
                break
            self.log(f"note: removing checkpoint {manifest.name}, newer than the one resumed from")
            manifest.unlink(missing_ok=True)
            for p in self.dir.glob(f"{manifest.stem}.*"):
                p.unlink(missing_ok=True)

    # ---------------------------------------------------------------- find
    def find_resumable(self, check_hash: bool = True) -> Optional[Checkpoint]:
        """The newest intact set (step sets, then ``last.json``, then a legacy ``last_state.pth``).

        Damaged sets are skipped with a warning; ``None`` when there is nothing to resume; ``InputError``
        when there are sets but every one is damaged."""
        candidates = self.step_manifests()
        if (self.output / LAST_MANIFEST).is_file():
            candidates.append(self.output / LAST_MANIFEST)
        for manifest in candidates:
            try:
                return Checkpoint(manifest, verify_manifest(manifest, check_hash=check_hash))
            except ValueError as e:
                self.log(f"warning: checkpoint {manifest} is unusable ({e}); trying the previous one")
        legacy = self.output / LAST_STATE
        if legacy.is_file() and not (self.output / LAST_MANIFEST).exists():
            try:
                return _legacy(legacy)
            except ValueError as e:
                self.log(f"warning: {legacy} is unusable ({e})")
        if candidates:
            # Starting over would silently discard the run (and overwrite its sets): stop instead.
            raise InputError(f"no intact checkpoint in {self.output}: all {len(candidates)} checkpoint sets are "
                             f"damaged (see the warnings above); pass --resume with an intact set, or remove "
                             f"{self.dir} to start from scratch")
        return None


def _manifest_for(path: Path) -> Path:
    """The manifest beside a checkpoint file: ``step-N.state.pth`` / ``step-N.safetensors`` ->
    ``step-N.json``; ``last_state.pth`` / ``last.safetensors`` -> ``last.json``."""
    name = path.name
    for suffix in (".state.pth", ".ema.safetensors", ".safetensors", "_state.pth"):
        if name.endswith(suffix):
            return path.with_name(name[:-len(suffix)] + ".json")
    return path


def resolve_resume(resume: Optional[str], output_dir, log: Callable[[str], None] = print,
                   keep_last: int = 3, check_hash: bool = True) -> Optional[Checkpoint]:
    """The checkpoint ``--resume`` names.

    - ``None``/``""``: none.
    - ``"auto"``: the newest intact set in ``output_dir`` (damaged ones skipped with a warning);
      none if there is nothing there, so a restarted job begins fresh; an error if every set is damaged.
    - a directory: the same lookup in that run directory.
    - a manifest, state or weights file: that very set, verified (an error if damaged).

    ``check_hash=False`` checks sizes only (ranks other than 0 re-open the set rank 0 verified).
    """
    if not resume:
        return None
    if resume == "auto":
        return CheckpointManager(output_dir, keep_last, log).find_resumable()
    path = Path(resume)
    if path.is_dir():
        found = CheckpointManager(path, keep_last, log).find_resumable()
        if found is None:
            raise InputError(f"--resume: no intact checkpoint in {path}")
        return found
    if not path.exists():
        raise InputError(f"--resume: no training state at {path}")
    manifest = path if path.suffix == ".json" else _manifest_for(path)
    if manifest.is_file():
        try:
            return Checkpoint(manifest, verify_manifest(manifest, check_hash=check_hash))
        except ValueError as e:
            raise InputError(f"--resume {path}: {e}") from e
    state = path if path.name.endswith(".pth") else path.with_name(LAST_STATE)
    try:
        return _legacy(state)
    except ValueError as e:
        raise InputError(f"--resume {path}: {e}") from e
