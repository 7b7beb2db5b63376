"""``robustkit <command>``: thin glue from arguments to library calls.

User errors (bad config, unknown names, missing files, invalid values) print one line
``robustkit: error: ...`` to stderr and exit with status 2, without a traceback. Set
``ROBUSTKIT_DEBUG=1`` to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from robustkit.commands import COMMANDS
from robustkit.errors import RobustkitError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="robustkit", description="Adversarial robustness: attack, defend, certify, "
                                "benchmark.")
    p.add_argument("--version", action="version", version=f"robustkit {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"robustkit.commands.{name}").register(sub)
    return p


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("robustkit")
    except Exception:  # noqa: BLE001
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except KeyboardInterrupt:
        print("robustkit: interrupted", file=sys.stderr)
        return 130
    except (RobustkitError, ValueError, KeyError, FileNotFoundError, TypeError) as e:
        if os.environ.get("ROBUSTKIT_DEBUG"):
            raise
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"robustkit: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
