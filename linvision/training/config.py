"""Run configuration: YAML files of flag defaults, ``--set key=value`` overrides, the saved resolved config.

Precedence, lowest first: the parser's defaults < ``-c/--config FILE`` (YAML mapping of flag names,
``-`` or ``_``) < ``--set key=value`` (any number; the value is read as YAML: ``--set
scale=[0.5,1.0]``, ``--set amp=false``) < the flags themselves (``--lr 1e-3``). Unknown keys are an
error (a typo must not train with a default silently). Every run writes its resolved config as
``<output>/config.yaml``, which ``-c`` reads back to repeat the run.
"""
import argparse
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import yaml

from ..checkpoint import atomic_write
from .common import plain

__all__ = ["parse_args_with_config", "load_config", "parse_sets", "config_dict", "save_config",
           "NOT_CONFIG_KEYS"]

# Parser destinations that describe how the config was given, not the run.
NOT_CONFIG_KEYS = ("help", "config", "set")


def load_config(path: str) -> Dict[str, Any]:
    """A YAML mapping of flag names to values, keys normalised to ``snake_case``."""
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in cfg.items()}


def parse_sets(items: Iterable[str]) -> Dict[str, Any]:
    """``["lr=1e-3", "scale=[0.5, 1.0]"]`` -> ``{"lr": "1e-3", "scale": [0.5, 1.0]}`` (YAML values;
    argparse later converts string values with the flag's type)."""
    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value.strip() else None
    return out


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` after applying ``-c/--config`` and ``--set`` as defaults.

    The parser must define ``-c/--config`` and ``--set`` (``action="append"``) itself so that they
    show in ``--help``; errors go through ``parser.error`` (exit status 2)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-c", "--config", default=None)
    pre.add_argument("--set", action="append", default=[])
    known, _ = pre.parse_known_args(argv)
    cfg: Dict[str, Any] = {}
    if known.config:
        try:
            cfg = load_config(known.config)
        except (OSError, yaml.YAMLError, ValueError) as e:
            parser.error(f"cannot read config {known.config}: {e}")
    try:
        cfg.update(parse_sets(known.set))
    except (ValueError, yaml.YAMLError) as e:
        parser.error(str(e))
    actions = {a.dest: a for a in parser._actions}
    cfg = _alias_keys(parser, cfg)
    # timm's args.yaml records its own -c as ``config: ''``: an empty entry names no second file.
    cfg = {k: v for k, v in cfg.items() if not (k in NOT_CONFIG_KEYS and v in ("", None, []))}
    unknown = sorted(set(cfg) - set(actions) | set(cfg) & set(NOT_CONFIG_KEYS))
    if unknown:
        where = known.config if known.config else "--set"
        parser.error(f"{where}: unknown keys {unknown}")
    parser.set_defaults(**cfg)
    for dest in cfg:
        actions[dest].required = False  # a config may provide --data-dir
    return parser.parse_args(argv)


def _alias_keys(parser: argparse.ArgumentParser, cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Keys named after an alias flag (timm's ``val_interval`` for ``--val-interval``, an alias of
    ``--eval-interval``) renamed to that flag's destination; ``no_X: true`` of a ``--X/--no-X``
    switch becomes ``X: false`` (``no_X: false`` leaves ``X`` at its default)."""
    by_flag = {opt: a for a in parser._actions for opt in a.option_strings}
    dests = {a.dest for a in parser._actions}
    out: Dict[str, Any] = {}
    for key, value in cfg.items():
        action = None if key in dests else by_flag.get("--" + key.replace("_", "-"))
        if action is None:
            out[key] = value
        elif isinstance(action, argparse.BooleanOptionalAction) and key.startswith("no_"):
            if value:
                out[action.dest] = False
        else:
            out[action.dest] = value
    return out


def config_dict(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The run's settings: every parser destination except :data:`NOT_CONFIG_KEYS`, as plain values."""
    dests = [a.dest for a in parser._actions if a.dest not in NOT_CONFIG_KEYS and a.dest != argparse.SUPPRESS]
    return {d: plain(getattr(args, d, None)) for d in dests}


def save_config(settings: Mapping[str, Any], path, header: Sequence[str] = ()) -> Path:
    """Atomically write ``settings`` as YAML, with ``header`` lines as comments on top."""
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(dict(settings), sort_keys=False, default_flow_style=None)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return atomic_write(path, write)
