"""The `lora2` command line: thin argument parsing; each subcommand calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys

from lora2.cli import adapter, evaluate, train, world


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora2", description="LoRA² adaptive-rank LoRA for diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in (train, adapter, evaluate, world):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lora2` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:
        logging.getLogger("lora2").error("%s", error)
        return 2
    except OSError as error:  # disk full, permissions: one line, not a traceback
        logging.getLogger("lora2").error("%s", error)
        return 1


if __name__ == "__main__":
    sys.exit(main())
