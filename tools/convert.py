#!/usr/bin/env python3
"""Convert an official checkpoint file to linvision's layout (``model.safetensors`` + ``config.json``).

    python tools/convert.py FLatten_swin_t.pth --model flatten_swin_t --output converted/flatten_swin_t
    python tools/convert.py qtvit_1.pt --name qtvit_1.in1k          # a manual download, into the cache

The file is read without running code from it, converted by the model family's checkpoint filter
and loaded strictly, so a written result is known to be complete. ``--name`` stores it as that
registry entry in the cache (checked against the registry's sha256 when it has one), where
``timm.create_model(NAME, pretrained=True)`` finds it; ``--model`` writes a folder that loads with
``timm.create_model("local-dir:OUTPUT")`` after ``import linvision``.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional

_BOOL = argparse.BooleanOptionalAction


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="the official checkpoint (.pth/.pt/.bin/.safetensors)")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--model", help="timm model name (optionally with a tag) to convert for")
    group.add_argument("--name", help="registry entry to store the file as (see tools/download.py --list)")
    parser.add_argument("--output", type=Path, default=None, help="output folder (--model; default: PATH's stem + '_linvision')")
    parser.add_argument("--use-ema", action=_BOOL, default=None,
                        help="EMA or raw weights of a container holding both (default: the family's choice)")
    args = parser.parse_args(argv)

    from linvision.pretrained import PretrainedError, convert_checkpoint, get_weight, store
    from linvision.serialization import CheckpointError
    try:
        if args.name:
            weights = store(get_weight(args.name), args.path)
            print(f"{args.name}: stored {weights}; timm.create_model('{args.name.split('.')[0]}', pretrained=True) uses it")
        else:
            out = args.output or args.path.with_name(args.path.stem + "_linvision")
            weights = convert_checkpoint(args.path, args.model, out, prefer_ema=args.use_ema)
            print(f"wrote {weights} and {out / 'config.json'}; load with "
                  f"timm.create_model('local-dir:{out}', pretrained=True) after `import linvision`")
    except (CheckpointError, PretrainedError, KeyError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
