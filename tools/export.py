#!/usr/bin/env python3
"""Write a trained linvision checkpoint as a hub-ready folder (model.safetensors, config.json, README.md).

    python tools/export.py output/linvit_t/best.safetensors --output hub/linvit_t-mnist
    python -c "import linvision, timm; timm.create_model('local-dir:hub/linvit_t-mnist', pretrained=True)"

Upload the folder to a Hugging Face model repository and ``timm.create_model("hf-hub:ORG/REPO",
pretrained=True)`` loads it after ``import linvision``.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="weights written by tools/train.py (best/last .safetensors)")
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument("--model", default=None, help="model name, when the file does not record it")
    parser.add_argument("--num-classes", type=int, default=None, help="when the file does not record it")
    args = parser.parse_args(argv)

    from linvision.pretrained import export_for_hub
    from linvision.serialization import CheckpointError
    try:
        out = export_for_hub(args.checkpoint, args.output, model_name=args.model, num_classes=args.num_classes)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 1
    print(f"wrote {out}/model.safetensors, config.json, README.md; load with "
          f"timm.create_model('local-dir:{out}', pretrained=True) after `import linvision`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
