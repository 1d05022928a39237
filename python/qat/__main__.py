"""``python -m qat``: tools for exported models.

    python -m qat inspect FILE    layers, bits, qparams and size of a file from qat.export
"""

import argparse
import sys

from .export import describe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser(
        "inspect", help="layers, bits, qparams and size of a file written by qat.export")
    inspect.add_argument("file")
    args = parser.parse_args(argv)
    try:
        print(describe(args.file))
    except (OSError, ValueError) as error:
        print(f"python -m qat {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
