"""`python -m pyoptim info`: what was built, and what serves each op here."""

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    """Print pyoptim.backend_info() as indented JSON (or one line with --compact)."""
    parser = argparse.ArgumentParser(prog="python -m pyoptim")
    sub = parser.add_subparsers(dest="cmd")
    info = sub.add_parser("info", help="what was built, and what serves each op on each device here")
    info.add_argument("--compact", action="store_true", help="one line of JSON")
    args = parser.parse_args(argv)
    if args.cmd != "info":
        parser.print_help()
        return 2
    import pyoptim

    print(json.dumps(pyoptim.backend_info(), indent=None if args.compact else 2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
