"""Print parameters and GMACs of registered models as JSON lines.

    python tools/flops.py linvit_b linvit_b_rala --img-size 224
"""
import argparse
import json

import timm

import linvision  # noqa: F401  (registers the models)
from linvision.complexity import model_complexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model names or timm wildcards (e.g. 'linvit_b*')")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], help="H [W]")
    args = parser.parse_args()
    h, w = (args.img_size * 2)[:2]
    names = [n for pattern in args.models for n in (timm.list_models(pattern) or [pattern])]
    for name in names:
        stats = model_complexity(timm.create_model(name), (3, h, w))
        print(json.dumps({"model": name, "img_size": [h, w], "params": stats["params"],
                          "gmacs": round(stats["gmacs"], 3)}))


if __name__ == "__main__":
    main()
