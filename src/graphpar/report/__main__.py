"""Command line of the report (the report rules call it; it also runs by hand).

python -m graphpar.report table table1 --results results --paper results/paper \
    --out-dir results/tables
python -m graphpar.report figure parity --results results --out-dir results/figures
python -m graphpar.report export --experiment mini --out mini-metrics.tar
python -m graphpar.report import colleague-metrics.tar [--as NAME] [--force] \
    [--max-member-mb 2000] [--max-total-mb 10000]
python -m graphpar.report config --config-json '{...}' --out results/report/config.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from graphpar.io import atomic_path
from graphpar.report import ALL_TABLES, FIGURES
from graphpar.report.bundle import DEFAULT_MAX_MEMBER_MB, DEFAULT_MAX_TOTAL_MB, MB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m graphpar.report",
        description=(
            "The paper's tables and figures from cached results (metrics, learning curves, "
            "predictions, benchmarks) beside the published numbers; metrics bundles."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def sources_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--results", type=Path, default=Path("results"), help="results folder (all experiments)"
        )
        command.add_argument(
            "--paper", type=Path, default=Path("results/paper"), help="the published numbers"
        )

    table = commands.add_parser("table", help="write <table>.md/.csv/.tex")
    table.add_argument("name", choices=ALL_TABLES)
    sources_options(table)
    table.add_argument("--out-dir", type=Path, default=Path("results/tables"))

    figure = commands.add_parser("figure", help="write <figure>.png/.pdf/.csv")
    figure.add_argument("name", choices=FIGURES)
    sources_options(figure)
    figure.add_argument(
        "--benchmarks",
        type=Path,
        default=None,
        help="benchmark JSON folder (default: <results>/benchmarks)",
    )
    figure.add_argument("--out-dir", type=Path, default=Path("results/figures"))

    export = commands.add_parser("export", help="write a metrics bundle (tar) of experiments")
    export.add_argument("--experiment", action="append", required=True, help="repeatable")
    export.add_argument("--results", type=Path, default=Path("results"))
    export.add_argument("--out", type=Path, required=True, help="the bundle (.tar)")
    export.add_argument(
        "--without-predictions", action="store_true", help="metrics and curves only (smaller)"
    )

    bundle_import = commands.add_parser("import", help="unpack a metrics bundle into results/")
    bundle_import.add_argument("bundle", type=Path)
    bundle_import.add_argument("--results", type=Path, default=Path("results"))
    bundle_import.add_argument(
        "--as",
        dest="rename",
        default=None,
        help="import a one-experiment bundle under this name (letters, digits, _ . -, first a "
        "letter or digit; not paper or benchmarks)",
    )
    bundle_import.add_argument(
        "--force", action="store_true", help="overwrite local files that differ"
    )
    bundle_import.add_argument(
        "--max-member-mb",
        type=float,
        default=DEFAULT_MAX_MEMBER_MB,
        help="refuse a member larger than this, uncompressed, in MB of 10^6 bytes (default "
        "%(default)s; an OC20 S2EF split's predictions npz is about 700 MB)",
    )
    bundle_import.add_argument(
        "--max-total-mb",
        type=float,
        default=DEFAULT_MAX_TOTAL_MB,
        help="refuse a bundle whose members together are larger than this, uncompressed, in MB "
        "(default %(default)s; the free disk is checked too)",
    )

    config = commands.add_parser("config", help="write the workflow's config as YAML")
    config.add_argument("--config-json", required=True, help="the config as one JSON string")
    config.add_argument("--out", type=Path, required=True)

    args = parser.parse_args(argv)
    if args.command == "table":
        from graphpar.report.tables import write_table

        for path in write_table(args.name, args.results, args.paper, args.out_dir).values():
            print(path)
    elif args.command == "figure":
        from graphpar.report.figures import write_figure

        benchmarks = args.benchmarks or args.results / "benchmarks"
        paths = write_figure(args.name, args.results, args.paper, benchmarks, args.out_dir)
        for path in paths.values():
            print(path)
    elif args.command == "export":
        from graphpar.report.bundle import export_bundle

        manifest = export_bundle(
            args.results, args.experiment, args.out, not args.without_predictions
        )
        print(f"{args.out}: {len(manifest['files'])} files of {', '.join(args.experiment)}")
    elif args.command == "import":
        from graphpar.report.bundle import BundleError, import_bundle

        try:
            experiments = import_bundle(
                args.bundle,
                args.results,
                args.rename,
                args.force,
                max_member_bytes=int(args.max_member_mb * MB),
                max_total_bytes=int(args.max_total_mb * MB),
            )
        except BundleError as error:
            sys.exit(f"error: {error}")
        print(f"imported {', '.join(experiments)} into {args.results}")
    elif args.command == "config":
        with atomic_path(args.out) as tmp:
            tmp.write_text(yaml.safe_dump(json.loads(args.config_json), sort_keys=False))


if __name__ == "__main__":
    main()
