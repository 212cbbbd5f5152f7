"""Command-line helpers shared by ``tools/train.py`` and ``tools/eval.py``: help with defaults, the
timm flags that are refused (with the reason), timm's aliases, the run directory, compile settings.

The tools accept timm's ``train.py`` / ``validate.py`` command lines. Flags that linvision cannot
honour with timm's meaning are still parsed, so that a pasted command stops with one line saying
why (``error: --aug-splits is not supported: ...``) instead of argparse's "unrecognized
arguments"; their defaults are timm's, so a timm ``args.yaml`` given to ``-c`` passes.
"""
import argparse
import importlib
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

__all__ = ["HelpFormatter", "Refused", "add_refused", "check_refused", "data_dir_from_args", "run_dir",
           "compile_settings", "import_device_modules", "COMPILE_MODES"]

# torch.compile modes; any other --torchcompile value is a backend name (timm's meaning).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default, including options without a help text (argparse's
    own formatter skips those, which hid the defaults of ``--epochs`` and ``--warmup-epochs``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return (text + " " if text else "") + "(default: %(default)s)"
        return text


class Refused:
    """A timm flag that is parsed but refused when set to anything but timm's default.

    Args:
        flags: its option strings, e.g. ``("--aug-splits",)``.
        reason: why linvision does not honour it (shown in ``--help`` and in the error).
        default: timm's default (a timm ``args.yaml`` holds it).
        kind: ``"switch"`` (store_true), ``"value"`` (one value) or ``"values"`` (``nargs='+'``).
    """

    def __init__(self, flags: Sequence[str], reason: str, default: Any = None, kind: str = "value"):
        self.flags, self.reason, self.default, self.kind = tuple(flags), reason, default, kind

    @property
    def dest(self) -> str:
        long = [f for f in self.flags if f.startswith("--")][0]
        return long[2:].replace("-", "_")


def add_refused(parser: argparse.ArgumentParser, refused: Iterable[Refused], title: str) -> None:
    """Add ``refused`` flags to ``parser`` in their own ``--help`` group, with the reason as help."""
    group = parser.add_argument_group(title)
    for r in refused:
        if r.kind == "switch":
            group.add_argument(*r.flags, dest=r.dest, action="store_true", default=bool(r.default), help=r.reason)
        else:
            group.add_argument(*r.flags, dest=r.dest, default=r.default, help=r.reason, metavar="X",
                               nargs="+" if r.kind == "values" else None)


def check_refused(parser: argparse.ArgumentParser, args: argparse.Namespace, refused: Iterable[Refused]) -> None:
    """``parser.error`` (exit status 2, one line) on the first refused flag set to a non-default value."""
    for r in refused:
        value = getattr(args, r.dest, r.default)
        if value is None or value == r.default or (r.kind == "values" and list(value) == list(r.default or [])):
            continue
        if r.kind == "value" and r.default is not None and str(value) == str(r.default):
            continue
        parser.error(f"{r.flags[-1]} is not supported: {r.reason}")


def data_dir_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """timm's rule: the positional ``DIR`` is the data directory unless ``--data-dir`` is given."""
    positional = getattr(args, "data", None)
    if positional and not args.data_dir:
        args.data_dir = positional
    if not args.data_dir:
        parser.error("the data directory is required: pass it as the positional DIR or with --data-dir")


def run_dir(output: Optional[str], experiment: Optional[str], model: str) -> str:
    """The run directory: ``--output`` itself, or ``<--output or output/train>/<--experiment>``.

    timm's ``train.py`` always adds a sub-directory (``--experiment``, else a time-stamped name);
    linvision uses ``--output`` as the run directory unless ``--experiment`` is given, so that a
    restarted job with the same command finds its checkpoints (``--resume auto``)."""
    if experiment:
        return str(Path(output or "output/train") / experiment)
    return output or f"output/train/{model}"


def compile_settings(args: argparse.Namespace) -> Tuple[Optional[str], str]:
    """``(mode or None when not compiling, backend)`` from ``--torchcompile [BACKEND]`` and
    ``--torchcompile-mode``. A mode name given to ``--torchcompile`` (``default``,
    ``reduce-overhead``, ...) is taken as the mode with the inductor backend (linvision's
    shorthand); anything else is timm's backend name."""
    value = getattr(args, "torchcompile", None)
    mode = getattr(args, "torchcompile_mode", None)
    if value is None:
        return None, "inductor"
    if value in COMPILE_MODES:
        return mode or value, "inductor"
    return mode or "default", value


def import_device_modules(modules: Optional[Sequence[str]]) -> None:
    """timm's ``--device-modules``: import each module (one that registers a device backend)."""
    for name in modules or ():
        importlib.import_module(name)

