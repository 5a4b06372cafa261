"""`python -m cinefx.testing tiny-models DIR`: write the tiny random-weight model bundle."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cinefx.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    tiny = sub.add_parser("tiny-models", help="write a tiny SD1.5-shaped bundle with random weights")
    tiny.add_argument("dir", help="folder to write (created)")
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from cinefx.testing.tiny import write_tiny_bundle

    out = write_tiny_bundle(args.dir, seed=args.seed)
    print(f"wrote tiny model bundle to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
