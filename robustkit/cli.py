"""``robustkit <command>``: thin glue from arguments to library calls.

The error boundary (design contract 10):

- bad input -- a ``RobustkitError`` (bad value or config, unknown name, missing or corrupt
  file, incompatible model and dataset; ``RegistryError`` is one) -- prints one line
  ``robustkit: error: ...`` to stderr and exits 2; argparse's own errors exit 2 as well;
- ``KeyboardInterrupt`` exits 130;
- anything else is a bug in robustkit: one line on stderr that says so, with the exception
  type and message, and exit 1.

Set ``ROBUSTKIT_DEBUG=1`` to get the traceback instead (the exception is re-raised).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from robustkit.commands import COMMANDS
from robustkit.errors import RobustkitError

DEBUG_VAR = "ROBUSTKIT_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustkit", description="Adversarial robustness: attack, defend, certify, "
                                "benchmark.")
    p.add_argument("--version", action="version", version=f"robustkit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"robustkit.commands.{name}").register(sub)
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("robustkit")
    except PackageNotFoundError:
        return "unknown"


def _debug() -> bool:
    return os.environ.get(DEBUG_VAR, "").strip().lower() not in ("", "0", "false", "no")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (``KeyError`` without its quotes)."""
    msg = str(e.args[0]) if isinstance(e, KeyError) and len(e.args) == 1 else str(e)
    return " ".join(msg.split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse errors: usage + message on stderr, SystemExit(2)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("robustkit: interrupted", file=sys.stderr)
        return 130
    except RobustkitError as e:
        if _debug():
            raise
        print(f"robustkit: error: {one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the boundary: everything else is a bug
        if _debug():
            raise
        print(f"robustkit: internal error (this is a bug in robustkit, please report it): {type(e).__name__}: "
              f"{one_line(e)} -- run again with {DEBUG_VAR}=1 to see the traceback", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
