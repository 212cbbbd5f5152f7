#!/usr/bin/env python3
"""timm's script name for ``tools/eval.py`` (same flags): ``python tools/validate.py DIR --model-list FILE --results-file r.csv``."""
from linvision.training.cli import build_eval_parser as build_parser  # noqa: F401  (for scripts that load this file)
from linvision.training.cli import eval_main as main
from linvision.training.distributed import run_then_destroy_process_group

if __name__ == "__main__":
    run_then_destroy_process_group(main)
