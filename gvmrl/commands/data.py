"""`gvmrl data prepare`: turn a dataset file or directory (or the built-in task) into a prompt file.

Rows become `{id, problem, answer}` JSONL, the format every other command reads; rows whose
answer cannot be extracted are dropped and counted (as the GVM reference's MATH and NuminaMath
preprocessing keep only problems with a boxed answer). `--split-test K` holds out K random rows
(seeded) into a second file beside the output.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import asdict
from pathlib import Path

from gvmrl.data import PRESETS, read_prompts
from gvmrl.io import InputError, check_output_path, write_jsonl

BUILTIN_PRESET = "builtin"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    prepare = actions.add_parser("prepare", help="write a {id, problem, answer} JSONL prompt file")
    presets = ", ".join(f"{name} ({preset.description})" for name, preset in PRESETS.items())
    prepare.add_argument(
        "--preset",
        choices=[*PRESETS, BUILTIN_PRESET],
        help=f"dataset layout: {presets}; {BUILTIN_PRESET} exports the built-in task. "
        "Without a preset, --problem-field/--answer-field name the fields.",
    )
    prepare.add_argument(
        "--input",
        help="JSONL/JSON/parquet file, `datasets` save_to_disk directory, a shipped evaluation "
        "set (math500, ...), or a built-in spec such as builtin:train or builtin-hard:test "
        "(the default with --preset builtin)",
    )
    prepare.add_argument("--output", required=True, type=Path, help="output JSONL file")
    prepare.add_argument("--limit", type=int, help="keep at most this many rows (after dropping)")
    prepare.add_argument(
        "--split-test",
        type=int,
        default=0,
        metavar="K",
        help="hold out K random rows as a test file",
    )
    prepare.add_argument(
        "--test-output", type=Path, help="test file (default: OUTPUT with suffix .test.jsonl)"
    )
    prepare.add_argument("--seed", type=int, default=0, help="seed of the test hold-out")
    prepare.add_argument(
        "--split", default="train", help="split of a DatasetDict directory or built-in task"
    )
    prepare.add_argument(
        "--problem-field", default="problem", help="problem field when no preset is given"
    )
    prepare.add_argument(
        "--answer-field", default="answer", help="answer field when no preset is given"
    )


def _test_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".test.jsonl")


def run(args: argparse.Namespace) -> int:
    if args.preset == BUILTIN_PRESET:
        source = args.input or "builtin"
    elif args.input is None:
        raise InputError("--input", None, "required unless --preset builtin")
    else:
        source = args.input
    if args.limit is not None and args.limit < 1:
        raise InputError("--limit", None, "must be >= 1")
    check_output_path(args.output)
    if args.split_test:
        check_output_path(args.test_output or _test_path(args.output))
    loaded = read_prompts(
        source,
        preset=None if args.preset == BUILTIN_PRESET else args.preset,
        problem_field=args.problem_field,
        answer_field=args.answer_field,
        limit=args.limit,
        split=args.split,
        drop_unanswered=True,
    )
    records = loaded.records
    if not records:
        raise InputError(
            source,
            None,
            f"no usable rows: {len(loaded.dropped_rows)} rows read, none with an extractable answer"
            if loaded.dropped_rows
            else "no rows",
        )
    if not 0 <= args.split_test < len(records):
        raise InputError(
            "--split-test", None, f"must be in [0, {len(records)}) for {len(records)} usable rows"
        )
    held_out = set(random.Random(args.seed).sample(range(len(records)), args.split_test))
    train = [asdict(r) for i, r in enumerate(records) if i not in held_out]
    test = [asdict(r) for i, r in enumerate(records) if i in held_out]

    write_jsonl(args.output, train)
    print(
        f"read {len(records) + len(loaded.dropped_rows)} rows from {source}: kept {len(records)}, "
        f"dropped {len(loaded.dropped_rows)} without an extractable answer"
    )
    print(f"wrote {len(train)} rows to {args.output}")
    if args.split_test:
        test_path = args.test_output or _test_path(args.output)
        write_jsonl(test_path, test)
        print(f"wrote {len(test)} rows to {test_path}")
    return 0
