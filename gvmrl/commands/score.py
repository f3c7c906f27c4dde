"""`gvmrl score`: grade a JSONL file of responses against reference answers.

Each output row is the input row plus `score` (1.0 or 0.0), `pred` (the extracted final
answer, or null) and `reason` (match, mismatch, no_answer, timeout or error: a comparison that
ran out of time scores 0 but is not a wrong answer). Every row is validated before any
grading, and the output is written atomically, so bad input leaves no output file.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

from gvmrl.io import InputError, check_output_path, read_jsonl, write_jsonl

# Rows sent to the grader at a time: small enough for a live progress bar, large enough to
# keep every worker busy.
_CHUNK_ROWS = 256


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="JSONL, a response and an answer per row")
    parser.add_argument(
        "--output", required=True, help="JSONL: input rows plus `score`, `pred`, `reason`"
    )
    parser.add_argument("--response-field", default="response", help="field of the response")
    parser.add_argument(
        "--answer-field", default="answer", help="field of the reference: string, number or list"
    )
    parser.add_argument(
        "--workers",
        type=_non_negative_int,
        default=1,
        help="grading processes, started only if math-verify is needed (0: in this process)",
    )
    parser.add_argument(
        "--timeout", type=_positive_seconds, default=5.0, help="seconds allowed per comparison"
    )


def _read_rows(path: str, response_field: str, answer_field: str) -> list[dict[str, Any]]:
    """All rows, each checked for a string response and a gradable answer where it stands."""
    from gvmrl.verify import reference_latex

    rows = []
    for line, row in read_jsonl(path):
        for field in (response_field, answer_field):
            if field not in row:
                raise InputError(path, line, f"field '{field}' missing")
        if not isinstance(row[response_field], str):
            raise InputError(path, line, f"field '{response_field}' must be a string")
        try:
            reference_latex(row[answer_field])
        except (TypeError, ValueError) as e:
            raise InputError(path, line, f"field '{answer_field}': {e}") from None
        rows.append(row)
    return rows


def run(args: argparse.Namespace) -> int:
    from gvmrl.progress import Progress
    from gvmrl.verify import Grader

    check_output_path(args.output)
    rows = _read_rows(args.input, args.response_field, args.answer_field)
    graded = []
    with Grader(workers=args.workers, timeout=args.timeout) as grader, Progress() as progress:
        task = progress.phase("grade", total=len(rows))
        for start in range(0, len(rows), _CHUNK_ROWS):
            chunk = rows[start : start + _CHUNK_ROWS]
            responses = [row[args.response_field] for row in chunk]
            grades = grader.grade_many(responses, [row[args.answer_field] for row in chunk])
            graded += [
                {**row, "score": g.score, "pred": g.pred, "reason": g.reason}
                for row, g in zip(chunk, grades)
            ]
            progress.advance(task, len(chunk))
        progress.end(task)
    write_jsonl(args.output, graded)
    correct = int(sum(row["score"] for row in graded))
    accuracy = f"{correct / len(graded):.4f}" if graded else "n/a"
    print(f"accuracy: {accuracy} ({correct}/{len(graded)})", file=sys.stderr)
    return 0
