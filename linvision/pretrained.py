"""Pretrained weights: the registry of official releases, the local cache and verified downloads.

The registry (``linvision/weights.json``, one entry per release) names, for every official
checkpoint, the timm tag or dense-task name, where the file comes from (a direct URL, a Hugging
Face hub file, or a page that needs a browser), its expected size and sha256 where known, what the
paper reports for it, its parameters, MACs and licence. ``list_weights()`` reads it.

Cache layout (one folder per entry, under :func:`cache_dir`)::

    <cache>/<name>/<original file name>   the download, kept so it can be converted again
    <cache>/<name>/model.safetensors      the weights in linvision's layout (strictly loaded once)
    <cache>/<name>/config.json            timm's hub config (architecture, pretrained_cfg, ...)
    <cache>/<name>/model.json             manifest: size + sha256 of model.safetensors and of the
                                          download, the source; written last, so it marks the
                                          entry complete

A cached folder is also a timm ``local-dir:`` model. :func:`cache_dir` is ``$LINVISION_HOME``
when set, else the ``checkpoints/`` folder of a source checkout (where ``tools/download.py`` puts
it), else ``~/.cache/linvision``.

``timm.create_model(name, pretrained=True)`` for a linvision model goes through
:func:`resolve_pretrained` (called by ``linvision.backbones._builder.build_model_with_cfg``): a
``pretrained_cfg_overlay=dict(file=PATH)`` is read with :func:`linvision.serialization.load_checkpoint_file`;
otherwise the cache is used, and a missing entry is downloaded (verified) unless the machine is
offline (``HF_HUB_OFFLINE=1`` or ``LINVISION_OFFLINE=1``), in which case the error names the
``tools/download.py`` command at once.
"""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from .checkpoint import atomic_write, sha256_file, write_manifest
from .serialization import (CheckpointError, check_checkpoint_model, first_line, load_checkpoint_file,
                            unwrap_checkpoint)

__all__ = ["WeightEntry", "list_weights", "get_weight", "cache_dir", "entry_dir", "cached_weights",
           "download_file", "fetch", "convert_checkpoint", "resolve_pretrained", "PretrainedError",
           "is_offline", "store", "export_for_hub", "entry_state", "run_download_cli"]

REGISTRY_FILE = Path(__file__).with_name("weights.json")


class PretrainedError(RuntimeError):
    """Weights that cannot be had: not cached and offline, a manual download, a failed transfer."""


@dataclass(frozen=True)
class WeightEntry:
    """One official release (see ``linvision/weights.json``).

    ``name`` is a timm tag (``ravlt_s.in1k``) for classification weights, or
    ``<arch>.<dataset>_<method>`` for detection/segmentation ones; ``model`` is the timm
    architecture the weights (or their backbone) load into.
    """
    name: str
    model: str
    task: str = "classification"
    url: Optional[str] = None
    hf_hub_id: Optional[str] = None
    hf_filename: Optional[str] = None
    page: Optional[str] = None             # where a person downloads it when no direct link exists
    filename: Optional[str] = None         # the downloaded file's name
    sha256: Optional[str] = None
    size: Optional[int] = None
    metrics: Dict[str, float] = field(default_factory=dict)   # as the paper/README reports them
    params_m: Optional[float] = None
    macs_g: Optional[float] = None
    license: Optional[str] = None
    paper: Optional[str] = None
    config: Optional[str] = None           # dense tasks: the repository config that builds the model
    notes: str = ""

    @property
    def source(self) -> str:
        """The download URL, or the page a person must visit (``manual``)."""
        if self.url:
            return self.url
        if self.hf_hub_id:
            endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
            return f"{endpoint}/{self.hf_hub_id}/resolve/main/{self.hf_filename}"
        return self.page or ""

    @property
    def manual(self) -> bool:
        """True when no direct link exists (a browser is needed)."""
        return not (self.url or self.hf_hub_id)

    @property
    def download_name(self) -> str:
        if self.filename:
            return self.filename
        if self.hf_filename:
            return Path(self.hf_filename).name
        return f"{self.name}.pth"


def _load_registry(path: Path = REGISTRY_FILE) -> Dict[str, WeightEntry]:
    with open(path) as f:
        raw = json.load(f)
    out = {}
    for item in raw["weights"]:
        entry = WeightEntry(**item)
        if entry.name in out:
            raise ValueError(f"{path.name}: duplicate entry {entry.name}")
        out[entry.name] = entry
    return out


_REGISTRY: Optional[Dict[str, WeightEntry]] = None


def _registry() -> Dict[str, WeightEntry]:
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _load_registry()
    return _REGISTRY


def list_weights(pattern: str = "*") -> List[WeightEntry]:
    """Registry entries whose name matches the shell-style ``pattern``, in registry order."""
    from fnmatch import fnmatch
    return [e for e in _registry().values() if fnmatch(e.name, pattern)]


def get_weight(name: str) -> WeightEntry:
    """The registry entry ``name`` (a tag such as ``ravlt_s.in1k``; a bare model name picks its
    only/first classification entry)."""
    reg = _registry()
    if name in reg:
        return reg[name]
    matches = [e for e in reg.values() if e.model == name and e.task == "classification"]
    if matches:
        return matches[0]
    close = sorted(n for n in reg if n.split(".")[0] == name.split(".")[0])
    hint = f"; entries for {name.split('.')[0]}: {', '.join(close)}" if close else "; `tools/download.py --list` shows all"
    raise KeyError(f"no registered weights named {name!r}{hint}")


# ---------------------------------------------------------------------------------------- cache
def cache_dir() -> Path:
    """Where downloads and converted weights live (see the module docstring)."""
    env = os.environ.get("LINVISION_HOME")
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent / "checkpoints"
    if (checkout / "README.md").is_file():
        return checkout
    return Path.home() / ".cache" / "linvision"


def entry_dir(name: str) -> Path:
    return cache_dir() / name


def cached_weights(name: str) -> Optional[Path]:
    """``model.safetensors`` of a complete cache entry (its manifest present), else ``None``."""
    d = entry_dir(name)
    weights, manifest = d / "model.safetensors", d / "model.json"
    return weights if weights.is_file() and manifest.is_file() else None


def is_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``LINVISION_OFFLINE`` is set to a true value."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "LINVISION_OFFLINE"))


# ------------------------------------------------------------------------------------- download
def _progress_bar(total: Optional[int], initial: int, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=not enabled, file=sys.stderr, dynamic_ncols=True)


def download_file(url: str, dest: Path, *, sha256: Optional[str] = None, size: Optional[int] = None,
                  progress: bool = True, timeout: float = 30.0, retries: int = 3,
                  log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Tuple[Path, str]:
    """Download ``url`` to ``dest``: resumable, verified, atomic.

    Bytes go to ``dest`` + ``.part``; an interrupted transfer resumes from there with an HTTP
    ``Range`` request (a server that ignores it sends everything again, and the part file starts
    over). Redirects are followed. When the transfer is complete its size and sha256 are checked
    against ``size``/``sha256`` (when given) and only then is the part file renamed to ``dest``; a
    mismatch deletes it and raises, so nothing unverified ever sits under the final name.

    Returns:
        ``(dest, sha256 hex digest of the file)``.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"User-Agent": "linvision-download"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status = getattr(response, "status", 200)
                if have and status != 206:
                    have = 0  # the server sent the whole file: start over
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else size
                mode = "ab" if have else "wb"
                with open(part, mode) as f, _progress_bar(total, have, dest.name, progress) as bar:
                    while True:
                        block = response.read(1 << 20)
                        if not block:
                            break
                        f.write(block)
                        bar.update(len(block))
                if length is not None and part.stat().st_size < total:
                    raise urllib.error.ContentTooShortError(
                        f"transfer ended at {part.stat().st_size} of {total} bytes", None)
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # range past the end: the part file is already complete
                break
            raise PretrainedError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            attempt += 1
            reason = getattr(e, "reason", e)
            if attempt > retries:
                raise PretrainedError(f"{url}: download failed after {retries} retries ({reason}); "
                                      f"run the same command again to resume from {part}") from None
            log(f"download interrupted ({reason}); resuming ({attempt}/{retries})")
            time.sleep(min(2.0 ** attempt, 10.0) * 0.1)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink()
        raise PretrainedError(f"{url}: got {got} bytes, expected {size}; the partial file was removed")
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink()
        raise PretrainedError(f"{url}: sha256 {digest[:12]}… differs from the expected {sha256[:12]}…; "
                              f"the file was removed (corrupted transfer or a changed release)")
    os.replace(part, dest)
    return dest, digest


# ------------------------------------------------------------------------------------ conversion
def _model_from(checkpoint: Any, model_name: str, source: Path, **kwargs):
    """``timm.create_model(model_name, **kwargs)`` with ``checkpoint`` loaded strictly through the
    family's filter; a checkpoint that does not fit is a one-line :class:`CheckpointError`."""
    import timm
    # The overlay's num_classes tells timm that the checkpoint's classifier fits the model.
    overlay = dict(state_dict=checkpoint, **({"num_classes": kwargs["num_classes"]} if "num_classes" in kwargs else {}))
    try:
        return timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{source}: does not load into {model_name} ({first_line(e)[:300]})") from None


def _download_record(path: Path, sha256: Optional[str]) -> Dict[str, Any]:
    """What an entry's manifest records of the file it was made from."""
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": sha256 or sha256_file(path)}


def convert_checkpoint(path: Path, model_name: str, out_dir: Path, *, sha256: Optional[str] = None,
                       size: Optional[int] = None, source: str = "", prefer_ema: Optional[bool] = None) -> Path:
    """Convert an official checkpoint file to ``out_dir/model.safetensors`` + ``config.json``.

    The file is read safely, converted by the model family's ``checkpoint_filter_fn`` and loaded
    strictly into ``timm.create_model(model_name)``; that model's ``state_dict`` is what is saved,
    so the result is verified to be complete. ``config.json`` is timm's hub config, so the folder
    also loads as ``timm.create_model("local-dir:" + out_dir)``. ``model.json`` (the manifest) is
    written last.

    Args:
        path: the official file (any container the family's filter understands).
        model_name: a timm model name, optionally with a tag (``flatten_swin_t.in1k``).
        prefer_ema: pick the EMA (True) or raw (False) weights of a container holding both;
            ``None`` leaves the choice to the family's filter (its documented default).
    """
    from timm.models._hub import save_config_for_hf

    from .checkpoint import save_weights

    path = Path(path)
    checkpoint = load_checkpoint_file(path, sha256=sha256, size=size)
    if prefer_ema is not None and isinstance(checkpoint, dict):
        checkpoint = unwrap_checkpoint(checkpoint, prefer_ema=prefer_ema)
    model = _model_from(checkpoint, model_name, path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = save_weights(model.state_dict(), out_dir / "model.safetensors",
                           dict(model=model_name.split(".")[0], converted_from=path.name))
    atomic_write(out_dir / "config.json", lambda tmp: save_config_for_hf(model, tmp))
    write_manifest(out_dir / "model.json", {"weights": weights},
                   dict(model=model_name, source=source, download=_download_record(path, sha256)))
    return weights


def fetch(name: str, *, progress: bool = True, force: bool = False, explicit: bool = False,
          log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> Path:
    """Make registry entry ``name`` available in the cache; return its ``model.safetensors``.

    Downloads (resuming a partial transfer), verifies size and sha256 where the registry knows
    them (recording the sha256 on first download otherwise), converts classification weights
    through the family's filter (dense-task files are stored as their state dict unchanged).

    ``explicit=True`` (``tools/download.py``) downloads even when :func:`is_offline` says the
    machine is offline: the user asked for it; implicit fetches (``pretrained=True``) do not.

    Raises:
        PretrainedError: offline, a manual-download source, or a failed transfer; the message
            says what to run.
    """
    entry = get_weight(name)
    if not force:
        cached = cached_weights(entry.name)
        if cached is not None:
            return cached
    d = entry_dir(entry.name)
    raw = d / entry.download_name
    if entry.manual and not raw.is_file():
        raise PretrainedError(
            f"{entry.name}: the release has no direct download link; download it in a browser from "
            f"{entry.source} and run `python tools/convert.py FILE --name {entry.name}`")
    if not raw.is_file():
        if is_offline() and not explicit:
            raise PretrainedError(f"{entry.name} is not in the cache ({d}) and the machine is offline; run "
                                  f"`python tools/download.py {entry.name}` where the network is reachable")
        log(f"downloading {entry.name} from {entry.source}")
        download_file(entry.source, raw, sha256=entry.sha256, size=entry.size, progress=progress, log=log)
    return store(entry, raw)


def store(entry: WeightEntry, raw: Path) -> Path:
    """Convert a downloaded (or manually placed) file of ``entry`` into its cache folder."""
    d = entry_dir(entry.name)
    if entry.task == "classification":
        return convert_checkpoint(raw, entry.name, d, sha256=entry.sha256, size=entry.size, source=entry.source)
    # Dense-task releases keep their detector/segmentor state dict (the mm/torchvision adapters
    # map its backbone keys); stored as safetensors so that reading it can never run code.
    from .checkpoint import save_weights
    import torch
    checkpoint = load_checkpoint_file(raw, sha256=entry.sha256, size=entry.size)
    state = unwrap_checkpoint(checkpoint) if isinstance(checkpoint, dict) else checkpoint
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{raw}: holds no tensors")
    weights = save_weights(tensors, d / "model.safetensors", dict(model=entry.model, task=entry.task))
    write_manifest(d / "model.json", {"weights": weights},
                   dict(model=entry.model, task=entry.task, source=entry.source,
                        download=_download_record(raw, entry.sha256)))
    return weights


# ------------------------------------------------------------------------ timm's pretrained=True
def resolve_pretrained(variant: str, pretrained_cfg: Any = None,
                       pretrained_cfg_overlay: Optional[Mapping[str, Any]] = None) -> Optional[Dict[str, Any]]:
    """The overlay that makes timm load ``variant``'s pretrained weights safely.

    Returns ``None`` where timm's own reader is already safe (``hf-hub:`` / ``local-dir:`` model
    sources, which read safetensors or ``weights_only`` pickles, or a ``state_dict`` given
    directly); otherwise an overlay whose ``state_dict`` is the checkpoint read by
    :func:`load_checkpoint_file` from the overlay's ``file``, the cache, or a fresh download.
    """
    from timm.models import resolve_pretrained_cfg

    cfg = resolve_pretrained_cfg(variant, pretrained_cfg=pretrained_cfg,
                                 pretrained_cfg_overlay=dict(pretrained_cfg_overlay or {})).to_dict()
    if cfg.get("source") in ("hf-hub", "local-dir") or cfg.get("state_dict") is not None:
        return None
    overlay = dict(pretrained_cfg_overlay or {})
    if cfg.get("file"):
        path = Path(cfg["file"])
        # A file written by another linvision model may fit this one shape for shape; refuse it.
        check_checkpoint_model(path, cfg.get("architecture") or variant, override=(
            "its tensors as pretrained_cfg_overlay=dict(state_dict=linvision.serialization.load_checkpoint_file(PATH))"))
    else:
        tag = cfg.get("tag") or ""
        name = f"{cfg.get('architecture') or variant.split('.')[0]}.{tag}" if tag else variant
        try:
            entry = get_weight(name)
        except KeyError:
            raise PretrainedError(f"no pretrained weights are registered for {name}; pass a file with "
                                  f"pretrained_cfg_overlay=dict(file=PATH) or use pretrained=False") from None
        path = cached_weights(entry.name) or fetch(entry.name)
    # timm prefers a cfg's state_dict over its file; the file stays as the record of the source.
    overlay.update(state_dict=load_checkpoint_file(path), file=str(path))
    return overlay


# --------------------------------------------------------------------------------------- export
def export_for_hub(weights_file: Path, out_dir: Path, model_name: Optional[str] = None,
                   num_classes: Optional[int] = None) -> Path:
    """Write a trained linvision checkpoint as a hub-ready folder.

    ``out_dir`` gets ``model.safetensors`` (the weights, strictly loaded into the model first),
    ``config.json`` (timm's hub config: architecture, classes, preprocessing) and ``README.md`` (a
    model card), plus the manifest ``model.json``. After ``import linvision`` the folder loads with
    ``timm.create_model("local-dir:" + out_dir)``, and once uploaded with
    ``timm.create_model("hf-hub:ORG/REPO")``.

    Args:
        weights_file: a ``.safetensors`` written by ``tools/train.py`` (its metadata names the
            model, classes and preprocessing) or any file :func:`load_checkpoint_file` reads.
        model_name, num_classes: needed when the file's metadata does not give them.
    """
    from timm.models._hub import save_config_for_hf

    from .checkpoint import read_weights_metadata, save_weights

    weights_file = Path(weights_file)
    meta = read_weights_metadata(weights_file) if weights_file.suffix == ".safetensors" else {}
    state = load_checkpoint_file(weights_file)
    model_name = model_name or meta.get("model")
    if not model_name:
        raise ValueError(f"{weights_file}: the file does not name its model; pass --model")
    num_classes = num_classes if num_classes is not None else meta.get("num_classes")
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.update({k: meta[k] for k in ("in_chans",) if meta.get(k) is not None})
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    model = _model_from(state, model_name, weights_file, **kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {k: meta[k] for k in ("input_size", "crop_pct", "interpolation", "mean", "std") if meta.get(k) is not None}
    if "input_size" in data:
        data["input_size"] = tuple(data["input_size"])
    model_config = {"label_names": list(meta["classes"])} if meta.get("classes") else None
    atomic_write(out_dir / "config.json",
                 lambda tmp: save_config_for_hf(model, tmp, model_config=model_config, data_config=data or None))
    weights = save_weights(model.state_dict(), out_dir / "model.safetensors", dict(meta, model=model_name))
    n_params = sum(p.numel() for p in model.parameters())
    card = "\n".join([
        "---", "library_name: timm", "tags: [image-classification, timm, linvision]", "---",
        f"# {out_dir.name}", "",
        f"A `{model_name}` ({n_params / 1e6:.2f}M parameters, {model.num_classes} classes) trained with linvision.", "",
        "```python", "import linvision, timm",
        f'model = timm.create_model("hf-hub:ORG/{out_dir.name}", pretrained=True)   # or "local-dir:PATH"',
        "```", "",
        "Training metadata: " + json.dumps({k: v for k, v in meta.items() if k != "classes"}, sort_keys=True), "",
    ])
    atomic_write(out_dir / "README.md", lambda tmp: Path(tmp).write_text(card))
    write_manifest(out_dir / "model.json", {"weights": weights}, dict(model=model_name))
    return out_dir


# ------------------------------------------------------------------------------ tools/download.py
def entry_state(entry: WeightEntry) -> str:
    """``cached``, ``downloaded`` (file present, not converted), ``partial``, ``manual`` or ``-``."""
    if cached_weights(entry.name) is not None:
        return "cached"
    d = entry_dir(entry.name)
    if (d / entry.download_name).is_file():
        return "downloaded"
    if (d / (entry.download_name + ".part")).is_file():
        return "partial"
    return "manual" if entry.manual else "-"


def _select(patterns: List[str]) -> List[WeightEntry]:
    from fnmatch import fnmatch
    reg = _registry()
    out: Dict[str, WeightEntry] = {}
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            found = [e for e in reg.values() if fnmatch(e.name, pattern) or fnmatch(e.model, pattern)]
            if not found:
                raise KeyError(f"no registered weights match {pattern!r}")
        else:
            found = [get_weight(pattern)]
        out.update((e.name, e) for e in found)
    return list(out.values())


def run_download_cli(names: List[str], list_only: bool = False, force: bool = False, progress: bool = True) -> int:
    """What ``tools/download.py`` does; returns its exit status."""
    if list_only:
        entries = _select(names) if names else list(_registry().values())
        width = max(len(e.name) for e in entries)
        print(f"{'name':<{width}}  {'task':<14} {'state':<10} source   (cache: {cache_dir()})")
        for e in entries:
            print(f"{e.name:<{width}}  {e.task:<14} {entry_state(e):<10} {e.source}")
        return 0
    try:
        entries = _select(names)
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    done, manual, failed = [], [], []
    for i, entry in enumerate(entries, 1):
        print(f"[{i}/{len(entries)}] {entry.name}", file=sys.stderr)
        try:
            path = fetch(entry.name, progress=progress, force=force, explicit=True)
            done.append(entry.name)
            print(f"  ready: {path}", file=sys.stderr)
        except PretrainedError as e:
            (manual if entry.manual else failed).append(entry.name)
            print(f"  {e}", file=sys.stderr)
        except (CheckpointError, OSError) as e:
            failed.append(entry.name)
            print(f"  error: {e}", file=sys.stderr)
    print(f"{len(done)} ready, {len(manual)} need a manual download, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed or manual else 0
