#!/usr/bin/env python3
"""timm's script name for ``tools/eval.py`` (same flags): ``python tools/validate.py DIR --model-list FILE --results-file r.csv``."""
import importlib.util
from pathlib import Path

from linvision.training.distributed import run_then_destroy_process_group

_spec = importlib.util.spec_from_file_location("_linvision_tool_eval", Path(__file__).with_name("eval.py"))
_eval = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_eval)
build_parser, main = _eval.build_parser, _eval.main

if __name__ == "__main__":
    run_then_destroy_process_group(main)
