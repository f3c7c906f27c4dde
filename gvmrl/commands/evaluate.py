"""`gvmrl eval`: accuracy and unbiased pass@k of a model on one or more prompt files.

Writes `--output` (a JSON summary per data file) and, beside it, one JSONL of per-prompt rows
per data file (`results.<dataname>.jsonl`), all only after every file has been evaluated, so a
failed run leaves no partial output.

    gvmrl eval --model builtin --data builtin:test --samples 8 --output runs/eval/results.json
    gvmrl eval --model DIR --data math500 --data amc23 --data my_problems.jsonl \
        --samples 4 --temperature 0.6 --max-new-tokens 2048 --output results.json

`--data` takes a prompt file, a built-in spec, or the name of an evaluation set shipped with the
package (math500, amc23, aime24, minerva_math, olympiadbench: `gvmrl.data.EVAL_SETS`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from gvmrl.data import EVAL_SETS, PRESETS
from gvmrl.rollout.base import ENGINES

# Response caps when --max-new-tokens is not given: built-in solutions are ~44 characters and
# its context is 512; chain-of-thought on MATH-style data runs to a few thousand tokens.
DEFAULT_MAX_NEW_TOKENS = {"builtin": 256, "other": 2048}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2^64), got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="builtin", help="checkpoint dir, hub id, or builtin")
    parser.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="SOURCE",
        help="prompt file (JSONL/JSON/parquet/datasets dir), builtin[:test], or a shipped set: "
        f"{', '.join(EVAL_SETS)}; repeatable",
    )
    parser.add_argument("--output", required=True, help="results JSON (per-prompt JSONL beside)")
    parser.add_argument("--samples", type=_positive_int, default=8, help="responses per prompt (k)")
    parser.add_argument("--temperature", type=_non_negative_float, default=1.0, help="0 is greedy")
    parser.add_argument("--top-p", type=_probability, default=1.0, help="nucleus mass in (0, 1]")
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help=f"response cap (default {DEFAULT_MAX_NEW_TOKENS['builtin']} for builtin, "
        f"{DEFAULT_MAX_NEW_TOKENS['other']} otherwise)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=512, help="most sequences per batch"
    )
    parser.add_argument("--seed", type=_seed, default=0)
    instruction = parser.add_mutually_exclusive_group()
    instruction.add_argument(
        "--instruction",
        default=None,
        help="appended to each problem (default: the \\boxed{} one; none for builtin)",
    )
    instruction.add_argument("--no-instruction", action="store_true", help="the problem alone")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="dataset preset")
    parser.add_argument("--problem-field", default="problem")
    parser.add_argument("--answer-field", default="answer")
    parser.add_argument("--split", default="test", help="split of a datasets dir or builtin spec")
    parser.add_argument("--limit", type=_positive_int, help="first N prompts of each file")
    parser.add_argument(
        "--overlong",
        choices=["skip", "error"],
        default="skip",
        help="prompts that with --max-new-tokens exceed the model's context: skip them (counted "
        "as skipped_overlong in the summary) or stop before sampling",
    )
    parser.add_argument("--engine", choices=sorted(ENGINES), default="hf")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    parser.add_argument("--workers", type=int, default=2, help="grading processes")
    parser.add_argument("--no-progress", action="store_true")


def data_names(sources: list[str]) -> list[str]:
    """A file-name-safe, unique name per data source: its stem (`math500`), `builtin-test`, ..."""
    names: list[str] = []
    for source in sources:
        stem = Path(source).stem if Path(source).exists() else source
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem)
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def _instruction(args: argparse.Namespace, model) -> str | None:
    from gvmrl.runtime import AUTO, instruction_for

    if args.no_instruction:
        return None
    return instruction_for(model, AUTO if args.instruction is None else args.instruction)


def run(args: argparse.Namespace) -> int:
    from gvmrl.builtin.model import BUILTIN
    from gvmrl.data import load_prompts
    from gvmrl.evaluation import evaluate
    from gvmrl.io import check_output_path, write_json, write_jsonl
    from gvmrl.models import load_model_and_tokenizer
    from gvmrl.progress import format_table
    from gvmrl.prompt_length import context_length, fit_to_context
    from gvmrl.rollout import SamplingParams, make_engine
    from gvmrl.runtime import resolve_device, resolve_dtype
    from gvmrl.verify import Grader

    output = Path(args.output)
    names = data_names(args.data)
    for path in [output, *(output.with_name(f"{output.stem}.{name}.jsonl") for name in names)]:
        check_output_path(path)
    datasets = {
        name: load_prompts(
            source,
            preset=args.preset,
            problem_field=args.problem_field,
            answer_field=args.answer_field,
            limit=args.limit,
            split=args.split,
        )
        for name, source in zip(names, args.data)
    }
    device = resolve_device(args.device)
    model, tokenizer = load_model_and_tokenizer(
        args.model, device=device, dtype=resolve_dtype("auto", device)
    )
    engine = make_engine(args.engine, model, tokenizer, max_batch_sequences=args.batch_size)
    max_new_tokens = (
        args.max_new_tokens
        or DEFAULT_MAX_NEW_TOKENS["builtin" if args.model == BUILTIN else "other"]
    )
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=max_new_tokens,
        seed=args.seed,
    )
    instruction = _instruction(args, model)
    fitted = {
        name: fit_to_context(
            records,
            tokenizer,
            instruction,
            context=context_length(model),
            max_new_tokens=max_new_tokens,
            overlong=args.overlong,
            source=source,
        )
        for (name, records), source in zip(datasets.items(), args.data)
    }
    for name, fit in fitted.items():
        if fit.skipped:
            print(
                f"eval {name}: skipped {len(fit.skipped)} prompts longer than "
                f"{fit.max_prompt_tokens} tokens (the context minus --max-new-tokens)",
                file=sys.stderr,
            )
    with Grader(workers=args.workers) as grader:
        results = {
            name: evaluate(
                engine,
                tokenizer,
                fit.records,
                samples=args.samples,
                params=params,
                grader=grader,
                instruction=instruction,
                progress=not args.no_progress,
                label=f"eval {name}",
            )
            for name, fit in fitted.items()
        }
    summaries: dict[str, dict[str, Any]] = {}
    for name, result in results.items():
        rows_file = output.with_name(f"{output.stem}.{name}.jsonl")
        write_jsonl(rows_file, result.rows)
        summaries[name] = {
            **result.summary(),
            "skipped_overlong": len(fitted[name].skipped),
            "rows_file": rows_file.name,
        }
    write_json(
        output,
        {
            "model": args.model,
            "engine": args.engine,
            "samples": args.samples,
            "sampling": {
                "temperature": params.temperature,
                "top_p": params.top_p,
                "max_new_tokens": params.max_new_tokens,
                "seed": params.seed,
            },
            "instruction": instruction,
            "data": dict(zip(names, args.data)),
            "results": summaries,
        },
    )
    columns = [c for c in next(iter(summaries.values())) if c != "rows_file"]
    print(format_table([{"data": n, **v} for n, v in summaries.items()], ["data", *columns]))
    print(f"wrote {output}")
    return 0
