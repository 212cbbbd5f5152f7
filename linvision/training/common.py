"""Definitions shared by the training modules."""
from typing import Any, Mapping

__all__ = ["InputError", "plain"]


class InputError(Exception):
    """Bad user input (paths, data layout, flags); the tools print it without a traceback."""


def plain(value: Any) -> Any:
    """``value`` reduced to containers of str/int/float/bool/None (``weights_only``-safe, JSON/YAML-able)."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return str(value)
