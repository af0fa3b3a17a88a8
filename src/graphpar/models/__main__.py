"""Model configurations on the command line, counted without allocating weights.

python -m graphpar.models --list
python -m graphpar.models --count dimenetpp-xl
python -m graphpar.models --count all
"""

from __future__ import annotations

import argparse

from graphpar.models import MODELS, count_parameters


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.models",
        description=(
            "List the registered model configurations, or print their parameter counts (built "
            "on the meta device: an XL model is counted without allocating its weights)."
        ),
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--list", action="store_true", help="list the configurations")
    action.add_argument(
        "--count", nargs="+", metavar="CONFIG", help="configuration name(s), or 'all'"
    )
    args = parser.parse_args(argv)

    if args.list:
        for name, (factory, settings) in MODELS.items():
            print(f"{name:18s} {factory.__name__}  {settings}")
        return
    names = list(MODELS) if args.count == ["all"] else args.count
    if unknown := [name for name in names if name not in MODELS]:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(MODELS)}")
    for name in names:
        print(f"{name:18s} {count_parameters(name):>15,d} parameters")


if __name__ == "__main__":
    main()
