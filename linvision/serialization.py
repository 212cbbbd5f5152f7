"""Reading checkpoint files without ever running code from them.

Every path in linvision that reads a checkpoint (``pretrained=True``, ``tools/eval.py``,
``tools/train.py`` initial weights and resume, the detection/segmentation builders, the mm
backbone's ``init_cfg``, ``tools/convert.py``) goes through :func:`load_checkpoint_file`:

- ``.safetensors`` files are read with safetensors (tensors only, no code possible);
- torch files (zip or legacy) are read with ``torch.load(weights_only=True)``, whose unpickler
  builds only tensors, containers and numbers, plus the short allow-list below of plain-data types
  that official training checkpoints contain. Nothing outside the list is ever imported or
  called: such a file is refused with a one-line :class:`CheckpointError` naming the type;
- where a sha256 (a registry entry, a download record or a linvision manifest beside the file)
  is known, the bytes are checked against it *before* they are parsed.

The allow-list, and how each type comes back (always as plain data):

====================================================  =========================================
pickled global                                         loaded as
====================================================  =========================================
``argparse.Namespace`` (MALA/RALA ``'args'``)          ``dict`` of its attributes
``yacs.config.CfgNode`` (FLatten/InLine ``'config'``)  nested ``dict`` (yacs need not be installed)
numpy arrays, scalars and dtypes (mmengine meta)       numpy objects (numpy's own constructors)
``mmengine...HistoryBuffer`` (mm ``'message_hub'``)    ``dict`` of its pickled state
====================================================  =========================================
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch


__all__ = ["CheckpointError", "load_checkpoint_file", "allow_plain_data_in_torch_load", "find_manifest_entry", "to_plain_data",
           "checkpoint_format", "checkpoint_model_name", "check_checkpoint_model", "sha256_file",
           "read_weights_metadata", "WEIGHTS_METADATA_KEY", "unwrap_checkpoint"]

PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: truncated, corrupted, unsafe or of the wrong model.

    The message is one line that starts with the file name and says what is wrong.
    """


class _PickledRecord(dict):
    """Inert stand-in for an allow-listed framework object: keeps its pickled state as data."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        if args or kwargs:
            self["args"] = list(args)
            self.update(kwargs)

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)
        else:
            self["state"] = state


def _numpy_globals():
    core = np._core.multiarray  # numpy >= 2 name; pickles from numpy 1.x say numpy.core.multiarray
    out = [np.ndarray, np.dtype]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(core._reconstruct, f"{mod}._reconstruct"), (core.scalar, f"{mod}.scalar")]
    # dtype objects are rebuilt through their class (e.g. numpy.dtypes.Float64DType).
    out += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return out


# A CfgNode is a dict subclass with a few flags in its __dict__; an OrderedDict can take both, and
# the weights-only unpickler fills only dicts and OrderedDicts, so CfgNodes are read as OrderedDicts.
_ALLOWED_GLOBALS = [
    argparse.Namespace,
    (collections.OrderedDict, "yacs.config.CfgNode"),
    (_PickledRecord, "mmengine.logging.history_buffer.HistoryBuffer"),
    *_numpy_globals(),
]


def allow_plain_data_in_torch_load() -> None:
    """Make every ``torch.load(weights_only=True)`` of this process accept the allow-list above.

    For mmengine's Runner, which reads its own and official mm* checkpoints with ``torch.load``
    (``weights_only=True`` by default in torch >= 2.6): their ``meta`` holds numpy values and their
    ``message_hub`` mmengine ``HistoryBuffer`` objects, which are allowed here as the real class
    (unpickling one only fills its attributes) so that a resumed run gets its buffers back.
    Nothing outside the list becomes loadable.
    """
    allowed = [g for g in _ALLOWED_GLOBALS if not (isinstance(g, tuple) and g[0] is _PickledRecord)]
    try:
        from mmengine.logging.history_buffer import HistoryBuffer
        allowed.append(HistoryBuffer)
    except ImportError:
        pass
    torch.serialization.add_safe_globals(allowed)


def to_plain_data(obj: Any) -> Any:
    """Namespaces, CfgNodes and stand-in records → dicts, recursively (tensors untouched)."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        return {k: to_plain_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_plain_data(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_plain_data(v) for v in obj)
    return obj


# The safetensors header key under which linvision.checkpoint.save_weights stores its JSON metadata.
WEIGHTS_METADATA_KEY = "linvision"


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def read_weights_metadata(path: PathLike) -> Dict[str, Any]:
    """The metadata ``linvision.checkpoint.save_weights`` stored in ``path``; ``{}`` for other files
    (``.pth``, foreign safetensors)."""
    if not str(path).endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(WEIGHTS_METADATA_KEY)
    return json.loads(raw) if raw else {}


# Container keys of the training scripts the official releases come from, weights first, EMA last.
RAW_KEYS = ("model", "state_dict")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")


def unwrap_checkpoint(checkpoint: Mapping[str, Any], prefer_ema: bool = False,
                      keys: Sequence[str] = ()) -> Dict[str, Any]:
    """The state dict inside a checkpoint container, or the checkpoint itself when it is one.

    Args:
        checkpoint: a plain state dict or a container such as ``{'model': sd, 'optimizer': ...,
            'state_dict_ema': sd_ema}``.
        prefer_ema: look at the EMA entries (``state_dict_ema``, ``model_ema``, ``ema``) before the
            raw ones (``model``, ``state_dict``); either way the other kind is the fallback.
        keys: extra container keys to try first (a family's own layout).
    """
    order = tuple(keys) + (EMA_KEYS + RAW_KEYS if prefer_ema else RAW_KEYS + EMA_KEYS)
    for key in order:
        value = checkpoint.get(key)
        if isinstance(value, Mapping) and value:
            return dict(value)
    return dict(checkpoint)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def checkpoint_format(path: PathLike) -> str:
    """``"safetensors"``, ``"torch-zip"``, ``"torch-legacy"`` or ``"unknown"``, from the file's first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1:
        return "safetensors"
    if head[:1] == b"\x80":  # pickle protocol opcode: torch.save(..., _use_new_zipfile_serialization=False)
        return "torch-legacy"
    return "unknown"


def find_manifest_entry(path: PathLike) -> Optional[Dict[str, Any]]:
    """The entry (``name``, ``bytes``, ``sha256``) that a linvision manifest beside ``path`` records
    for it, or ``None``. Manifests are ``X.json`` next to ``X.safetensors`` / ``X.ema.safetensors``
    / ``X.state.pth`` (training runs, ``tools/export.py``, ``tools/download.py``)."""
    path = Path(path)
    stem = path.name.split(".")[0]
    for cand in dict.fromkeys((path.with_suffix(".json"), path.with_name(stem + ".json"))):
        if cand == path or not cand.is_file():
            continue
        try:
            manifest = json.loads(cand.read_text())
            entries = manifest["files"].values()
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        for entry in entries:
            if isinstance(entry, dict) and entry.get("name") == path.name:
                return entry
    return None


def _check_bytes(path: Path, size: Optional[int], sha256: Optional[str], what: str) -> None:
    actual = path.stat().st_size
    if size is not None and actual != size:
        kind = "truncated" if actual < size else "not the expected file"
        raise CheckpointError(f"{path}: {actual} bytes where {what} records {size} ({kind})")
    if sha256 and sha256_file(path) != sha256.lower():
        raise CheckpointError(f"{path}: sha256 differs from the one {what} records (corrupted or a different file)")


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _torch_load(path: Path, map_location) -> Any:
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on pickle protocols: the errors below say it all
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        m = _GLOBAL_RE.search(text)
        if m:
            raise CheckpointError(
                f"{path}: refused to unpickle {m.group(1)}, which is not one of the plain-data types linvision "
                f"reads from checkpoints (loading it could run code from the file)") from None
        reason = text.split("WeightsUnpickler error:")[-1].strip().splitlines()
        reason = reason[0] if reason else "unknown reason"
        if "truncated" in reason or "EOF" in reason:
            raise CheckpointError(f"{path}: the pickle ends early (truncated)") from None
        if "Unsupported operand" in reason:
            raise CheckpointError(f"{path}: not a torch.save checkpoint (a pickle stream with instructions the "
                                  f"safe reader does not accept)") from None
        raise CheckpointError(f"{path}: refused to unpickle it ({reason[:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        first = first_line(e)
        if "central directory" in first or isinstance(e, EOFError) or "truncated" in first.lower():
            raise CheckpointError(f"{path}: incomplete torch archive (truncated or corrupted)") from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({first[:160]})") from None


def load_checkpoint_file(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                         sha256: Optional[str] = None, size: Optional[int] = None,
                         check_manifest: bool = True) -> Any:
    """Read a checkpoint file safely and return its content as plain data.

    Args:
        path: a ``.safetensors`` file or a ``torch.save`` file (zip or legacy), whatever its suffix.
        map_location: where tensors go (as ``torch.load``).
        sha256, size: expected hex digest and byte count (a registry entry); checked before parsing.
        check_manifest: also check the size and sha256 a linvision manifest beside the file records.

    Returns:
        For safetensors: ``{name: tensor}``. For torch files: whatever was saved, with the
        allow-listed objects turned into dicts (:func:`to_plain_data`).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: truncated, corrupted, of an unknown format, or needing a type outside the
            allow-list; a one-line message starting with the path.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    _check_bytes(path, size, sha256, "the registry")
    if check_manifest:
        entry = find_manifest_entry(path)
        if entry is not None:
            _check_bytes(path, entry.get("bytes"), entry.get("sha256"), "its manifest")
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid safetensors file ({first_line(e)[:160]}; truncated or "
                                  f"corrupted)") from None
    if fmt == "unknown":
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: empty file")
        raise CheckpointError(f"{path}: neither a safetensors nor a torch checkpoint (unrecognised first bytes)")
    return to_plain_data(_torch_load(path, map_location))


def _architecture(name: str) -> str:
    # "mavit_s.in1k" -> "mavit_s": a pretrained tag names weights, not a different model.
    return name.split(".", 1)[0]


def checkpoint_model_name(path: PathLike) -> Optional[str]:
    """The model name a linvision ``.safetensors`` file records (training runs, downloads, exports),
    or ``None`` for files that record none (``.pth``, foreign safetensors)."""
    path = Path(path)
    if not path.is_file() or checkpoint_format(path) != "safetensors":
        return None
    try:
        meta = read_weights_metadata(path) if path.name.endswith(".safetensors") else {}
    except Exception:  # an unreadable header is reported by the reader that follows, not here
        return None
    name = meta.get("model") if isinstance(meta, dict) else None
    return str(name) if name else None


def check_checkpoint_model(path: PathLike, model_name: str, allow: bool = False,
                           override: str = "--allow-model-mismatch") -> Optional[str]:
    """Refuse to load a checkpoint written by another model into ``model_name``.

    Two models can share every tensor shape (``linvit_t`` and ``mavit_t``) and still compute
    different functions, so a strict ``load_state_dict`` alone would accept the wrong file.

    Args:
        path: the checkpoint file.
        model_name: the model about to receive it (a pretrained tag is ignored on both sides).
        allow: load anyway (the caller's ``override`` was given).
        override: how the user overrides, named in the error.

    Returns:
        The recorded model name, or ``None`` when the file records none.

    Raises:
        CheckpointError: one line naming both models and the override.
    """
    written_by = checkpoint_model_name(path)
    if (written_by and not allow and ":" not in model_name
            and _architecture(written_by) != _architecture(model_name)):
        raise CheckpointError(f"{path}: written by model {written_by!r}, not {model_name!r}; load it into "
                              f"{_architecture(written_by)}, or pass {override} to load it into {model_name} anyway")
    return written_by
