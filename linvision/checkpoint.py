"""Atomic checkpoint files: model weights as safetensors, training state as a torch pickle.

Every writer here goes through :func:`atomic_write`: the bytes go to a temporary file in the
destination's directory, are flushed and fsynced, and only then ``os.replace`` moves the file onto
its final name (atomic on POSIX when both names are on one filesystem, which a sibling temp file
guarantees). An interrupted or failing write therefore leaves the previous file intact and never a
truncated file under the final name: a rule for every file the project writes.

Files:
    ``*.safetensors``: the model's ``state_dict`` (tensors only) plus string metadata; readable by
        ``timm.models.load_checkpoint`` and ``pretrained_cfg_overlay=dict(file=...)``.
    ``*_state.pth``: optimizer, scheduler, epoch counters, RNG states and run arguments — plain
        containers, tensors and numbers only, so it loads with ``torch.load(weights_only=True)``.
    ``*.json``: a manifest naming the files of one checkpoint with their size and sha256
        (:func:`write_manifest`); written last, so its presence marks the checkpoint complete, and
        :func:`verify_manifest` detects a truncated or corrupted file.
"""
import errno
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np
import torch
from safetensors.torch import save_file

# The reading side (the safe loader and the metadata/hash helpers it needs) lives in .serialization;
# this module writes, and re-exports those readers for its callers.
from .serialization import WEIGHTS_METADATA_KEY, load_checkpoint_file, read_weights_metadata, sha256_file

__all__ = [
    "atomic_write", "save_weights", "load_weights", "read_weights_metadata",
    "save_state", "load_state", "capture_rng_state", "restore_rng_state",
    "atomic_link", "sha256_file", "write_json", "read_json", "write_manifest", "verify_manifest",
]

PathLike = Union[str, os.PathLike]


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems do not support fsync on a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[str], None]) -> Path:
    """Create or replace ``path`` atomically.

    Args:
        path: the final file name; its directory is created if missing.
        write: called with a temporary file name in the same directory; it must write the complete
            file there (it may open, write and close it as it likes).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    If ``write`` raises (or the process dies), the temporary file is removed (or left as a hidden
    ``.<name>.*.tmp`` sibling) and ``path`` keeps its previous content, if any.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temp file behind either.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            # The bare "[Errno 28] No space left on device" names neither the file nor the disk.
            free_mib = shutil.disk_usage(path.parent).free / 2 ** 20
            raise OSError(errno.ENOSPC, f"no space left on device while writing {path} ({free_mib:.0f} MiB "
                                        f"free there after removing the partial file); free some space or "
                                        f"write elsewhere") from e
        raise
    _fsync_dir(path.parent)
    return path


def atomic_link(src: PathLike, dst: PathLike) -> Path:
    """Make ``dst`` name the same file as ``src`` (a hard link, no copy), replacing ``dst``
    atomically; copies (atomically) where the filesystem has no hard links."""
    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.{os.getpid()}.link.tmp"
    try:
        if tmp.exists():
            tmp.unlink()
        os.link(src, tmp)
    except OSError:
        import shutil
        return atomic_write(dst, lambda t: shutil.copyfile(src, t))
    os.replace(tmp, dst)
    _fsync_dir(dst.parent)
    return dst


def _tensors_for_safetensors(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous tensors; a tensor sharing storage with an earlier one (tied weights, views)
    is cloned, because safetensors refuses tensors whose memory overlaps."""
    out, seen = {}, set()
    for name, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
            else:
                seen.add(ptr)
        out[name] = t
    return out


def save_weights(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                 metadata: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write a model ``state_dict`` as safetensors.

    Args:
        state_dict: parameter/buffer name -> tensor (any device, any dtype; stored as is).
        path: destination, conventionally ``*.safetensors``.
        metadata: JSON-serialisable run information (model name, classes, input size, epoch…),
            stored as one JSON string and returned by :func:`read_weights_metadata`.
    """
    tensors = _tensors_for_safetensors(state_dict)
    header = {"format": "pt"}  # what timm/transformers expect for torch-written files
    if metadata:
        header[WEIGHTS_METADATA_KEY] = json.dumps(dict(metadata), sort_keys=True)
    # Looked up at call time (not bound at import) so tests can simulate a failing serializer.
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def load_weights(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a ``state_dict`` written by :func:`save_weights` (any safetensors file), checked against
    the manifest beside it when there is one."""
    return load_checkpoint_file(path, device)


def save_state(state: Mapping[str, Any], path: PathLike) -> Path:
    """Atomically ``torch.save`` a training-state dict (optimizer, scheduler, counters, RNG…)."""
    return atomic_write(path, lambda tmp: torch.save(dict(state), tmp))


def load_state(path: PathLike, device: Union[str, torch.device] = "cpu") -> Dict[str, Any]:
    """Load a training-state dict written by :func:`save_state` (never runs code from the file)."""
    return load_checkpoint_file(path, device)


def capture_rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states, in ``weights_only``-loadable form."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        # The MT19937 key is an ndarray, which weights_only loading rejects; store it as a tensor.
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`; CUDA states are restored only where a GPU is present."""
    random.setstate(state["python"])
    npst = state["numpy"]
    np.random.set_state({"bit_generator": npst["bit_generator"],
                         "state": {"key": npst["key"].numpy().astype(np.uint32), "pos": npst["pos"]},
                         "has_gauss": npst["has_gauss"], "gauss": npst["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def write_json(obj: Any, path: PathLike) -> Path:
    """Atomically write ``obj`` as indented JSON."""
    text = json.dumps(obj, indent=1, sort_keys=True) + "\n"

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)


def read_json(path: PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def write_manifest(path: PathLike, files: Mapping[str, PathLike], info: Optional[Mapping[str, Any]] = None) -> Path:
    """Atomically write a manifest for files that are already complete on disk.

    Args:
        path: the manifest (``*.json``); file names in it are relative to its directory, so the
            manifest and its files must share one.
        files: role (``"weights"``, ``"state"``, ...) -> file path.
        info: extra JSON-able fields (step, epoch...).
    """
    path = Path(path)
    entries = {}
    for role, f in files.items():
        f = Path(f)
        if f.parent.resolve() != path.parent.resolve():
            raise ValueError(f"{f} is not in the manifest's directory {path.parent}")
        entries[role] = {"name": f.name, "bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return write_json(dict(info or {}, format="linvision.manifest/1", files=entries), path)


def verify_manifest(path: PathLike, check_hash: bool = True) -> Dict[str, Path]:
    """Check that every file a manifest names exists with the recorded size and sha256.

    Returns:
        role -> file path.

    Raises:
        ValueError: naming the first missing, truncated or corrupted file (or an unreadable manifest).
    """
    path = Path(path)
    try:
        manifest = read_json(path)
        entries = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unreadable manifest {path.name}: {e}") from e
    out = {}
    for role, entry in entries.items():
        f = path.parent / entry["name"]
        if not f.is_file():
            raise ValueError(f"{f.name} is missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise ValueError(f"{f.name} has {size} bytes, the manifest records {entry['bytes']} (truncated?)")
        if check_hash and sha256_file(f) != entry["sha256"]:
            raise ValueError(f"{f.name} does not match its recorded sha256 (corrupted)")
        out[role] = f
    return out
