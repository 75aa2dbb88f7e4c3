"""`python -m scn_scale.importers {rafdb,ferplus,affectnet,imagefolder,csv} --root DIR --out DIR`.

Benchmark importers write one shard set per split under `--out` (`train`, `val`, `test`
as the benchmark has them); `imagefolder` and `csv` write the one set `--out`, its
samples tagged `--split`. A summary of per-class counts and dropped samples is printed
and saved as `import_summary.json` in `--out`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from scn_scale.importers import (
    ImporterError,
    ImportOptions,
    import_affectnet,
    import_csv,
    import_ferplus,
    import_imagefolder,
    import_rafdb,
)
from scn_scale.importers.common import parse_classes
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging
from shards.pixels import DEFAULT_MAX_PIXELS
from shards.fs import UnknownScheme
from shards.lock import OutputLocked


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m scn_scale.importers",
        description="Import a public FER benchmark (one shard set per split) or an image tree (one set).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory or object-store URL (s3://..., gs://...)")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    common.add_argument(
        "--shuffle-seed", type=int, default=0,
        help="samples are written in a random order drawn from this seed, so every shard holds every class "
        "(recorded in stats.json; default 0)",
    )
    common.add_argument(
        "--allow-missing", action="store_true", help="drop and count listed images that are missing or unreadable"
    )
    common.add_argument(
        "--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
        help=f"refuse images whose header declares more pixels (default {DEFAULT_MAX_PIXELS}; 0: no cap); "
        "readers of the set skip them",
    )
    add_log_level(common)

    rafdb = sub.add_parser("rafdb", parents=[common], help="RAF-DB basic: EmoLabel/ + Image/aligned/")
    rafdb.add_argument("--root", required=True, help="the RAF-DB basic folder")
    rafdb.add_argument(
        "--noisy-labels", action="append", default=[], metavar="FILE",
        help="a noisy label file in RAF-DB's format; written as an override table beside the sets (repeatable)",
    )
    ferplus = sub.add_parser(
        "ferplus", parents=[common], help="FERPlus: fer2013.csv + fer2013new.csv, or FER2013Train/..."
    )
    ferplus.add_argument("--root", required=True)
    affectnet = sub.add_parser(
        "affectnet", parents=[common], help="AffectNet: Manually_Annotated_* or an ImageFolder copy"
    )
    affectnet.add_argument("--root", required=True)
    affectnet.add_argument("--protocol", type=int, choices=(7, 8), default=8, help="7 (no contempt) or 8 classes")

    for name, help_text in (("imagefolder", "ROOT/<class name>/<image>"), ("csv", "a csv of path,label rows")):
        p = sub.add_parser(name, parents=[common], help=help_text)
        if name == "csv":
            p.add_argument("--list", required=True, help="the csv file")
            p.add_argument("--root", help="folder the paths are relative to (default: the list's folder)")
        else:
            p.add_argument("--root", required=True)
        p.add_argument("--split", default="train", help="split name recorded in the samples (default train)")
        p.add_argument("--classes", help="class list: basic7, all, or comma-separated names (default: those found)")
        p.add_argument("--dataset", default=name, help=f"dataset name, the prefix of sample keys (default {name})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(args.log_level, "%(levelname)s %(name)s: %(message)s")
    options = ImportOptions(shard_size=args.shard_size, shuffle_seed=args.shuffle_seed, allow_missing=args.allow_missing,
                            max_pixels=args.max_pixels or None)
    try:
        if options.shard_size < 1:
            raise ImporterError(f"--shard-size must be positive, got {options.shard_size}")
        if args.max_pixels < 0:
            raise ImporterError(f"--max-pixels must be >= 0, got {args.max_pixels}")
        if args.command == "rafdb":
            summary = import_rafdb(args.root, args.out, args.noisy_labels, options)
        elif args.command == "ferplus":
            summary = import_ferplus(args.root, args.out, options)
        elif args.command == "affectnet":
            summary = import_affectnet(args.root, args.out, args.protocol, options)
        else:
            classes = parse_classes(args.classes) if args.classes else None
            if args.command == "imagefolder":
                summary = import_imagefolder(args.root, args.out, args.split, classes, args.dataset, options)
            else:
                summary = import_csv(args.list, args.out, args.root, args.split, classes, args.dataset, options)
    except (ImporterError, OutputLocked, UnknownScheme) as exc:  # OutputLocked: another import writes --out
        return bad_input(exc)
    print(summary.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
