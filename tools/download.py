#!/usr/bin/env python3
"""Download, verify and convert official pretrained weights into linvision's cache.

    python tools/download.py --list                       every release, its source and cache state
    python tools/download.py ravlt_s.in1k flatten_swin_t.in1k
    python tools/download.py 'inline_*'                   shell-style patterns over registry names

Each file is downloaded with a progress bar (an interrupted transfer resumes), checked against the
size and sha256 the registry records, converted to ``model.safetensors`` + ``config.json`` in
linvision's layout (loaded strictly once) and placed atomically under the cache
(``$LINVISION_HOME``, else ``checkpoints/`` of this checkout). Releases without a direct link print
the page to download from and the ``tools/convert.py`` line to run afterwards. Then
``timm.create_model(NAME, pretrained=True)`` uses the cached file.
"""
import argparse
import sys
from typing import List, Optional

from linvision.pretrained import run_download_cli


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="registry names, model names or shell-style patterns")
    parser.add_argument("--list", action="store_true", help="list every release with its source and cache state")
    parser.add_argument("--force", action="store_true", help="download and convert again even when cached")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(argv)
    if not args.names and not args.list:
        parser.error("name at least one release, or --list")
    return run_download_cli(args.names, list_only=args.list, force=args.force, progress=args.progress)


if __name__ == "__main__":
    sys.exit(main())
