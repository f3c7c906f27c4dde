"""`gvmrl stats`: per-prompt accept rates and gradient norms from scored samples (GVM stage 2).

Input rows (`gvmrl score` output): `prompt_id`, `prompt` (the raw problem text), `response`,
`score`, and optionally `finish_reason` ("length" = truncated, so no EOS is appended). Output rows:
`prompt_id, accept_rate, grad_norm, num_samples, num_accepted`, the file `gvmrl allocate --stats`
reads. Gradient norms are computed for accepted samples only, since G_i averages over those.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

from gvmrl.io import InputError, check_output_path, read_jsonl, write_jsonl

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class ScoredSample:
    prompt_id: str | int
    prompt: str
    response: str
    score: float
    truncated: bool


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory, hub id, or `builtin`")
    parser.add_argument(
        "--completions", required=True, help="SCORED.jsonl: prompt_id, prompt, response, score"
    )
    parser.add_argument("--output", required=True, help="STATS.jsonl, one row per prompt")
    parser.add_argument(
        "--params",
        default="embed_tokens",
        help="parameter group: name substring(s), comma-separated (embed_tokens, lm_head)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="sequences per gradient-norm pass"
    )
    parser.add_argument(
        "--accept-threshold",
        type=float,
        help="accepted when score >= this (default: gvmrl.records.ACCEPT_THRESHOLD, 0.5)",
    )
    instruction = parser.add_mutually_exclusive_group()
    instruction.add_argument(
        "--instruction",
        default=None,
        help="text appended to each problem (default: none for builtin)",
    )
    instruction.add_argument(
        "--no-instruction", action="store_true", help="format prompts without instruction"
    )
    parser.add_argument(
        "--device", default=None, help="torch device (default: cuda if available, else cpu)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="auto: bfloat16 on cuda, float32 on cpu"
    )


def read_scored(path: str) -> list[ScoredSample]:
    """All rows, each checked where it stands; one prompt id must always carry the same prompt."""
    samples: list[ScoredSample] = []
    prompts: dict[str | int, str] = {}
    for line, row in read_jsonl(path):
        prompt_id = _field(row, "prompt_id", (str, int), path, line)
        prompt = _field(row, "prompt", (str,), path, line)
        response = _field(row, "response", (str,), path, line)
        score = _field(row, "score", (int, float), path, line)
        if not math.isfinite(score):
            raise InputError(path, line, f"field 'score' must be finite, got {score!r}")
        if prompts.setdefault(prompt_id, prompt) != prompt:
            raise InputError(
                path,
                line,
                f"field 'prompt' differs from an earlier row with prompt_id {prompt_id!r}",
            )
        samples.append(
            ScoredSample(
                prompt_id, prompt, response, float(score), row.get("finish_reason") == "length"
            )
        )
    if not samples:
        raise InputError(path, None, "no rows")
    return samples


def _field(row: dict[str, Any], name: str, types: tuple[type, ...], path: str, line: int) -> Any:
    if name not in row:
        raise InputError(path, line, f"field '{name}' missing")
    value = row[name]
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        expected = " or ".join("number" if t in (int, float) else t.__name__ for t in types)
        raise InputError(path, line, f"field '{name}' must be {expected}, got {value!r}")
    return value


def _parse_params(text: str) -> str | list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise InputError("--params", None, "empty parameter group")
    return names[0] if len(names) == 1 else names


def run(args: argparse.Namespace) -> int:
    check_output_path(args.output)
    samples = read_scored(args.completions)
    params = _parse_params(args.params)
    if args.batch_size < 1:
        raise InputError("--batch-size", None, f"must be >= 1, got {args.batch_size}")

    from gvmrl.data import format_prompt
    from gvmrl.estimation import prompt_stats, resolve_parameter_group, sequence_grad_norms
    from gvmrl.models import load_model_and_tokenizer
    from gvmrl.records import ACCEPT_THRESHOLD, is_accepted
    from gvmrl.runtime import AUTO, instruction_for, resolve_device, resolve_dtype

    device = resolve_device(args.device or AUTO)
    model, tokenizer = load_model_and_tokenizer(
        args.model, device=device, dtype=resolve_dtype(args.dtype, device)
    )
    try:
        resolve_parameter_group(model, params)
    except ValueError as e:
        raise InputError("--params", None, str(e)) from None
    instruction = (
        None
        if args.no_instruction
        else instruction_for(model, AUTO if args.instruction is None else args.instruction)
    )

    threshold = ACCEPT_THRESHOLD if args.accept_threshold is None else args.accept_threshold
    accepted = [i for i, ok in enumerate(is_accepted([s.score for s in samples], threshold)) if ok]
    prompt_ids: dict[str, list[int]] = {}
    for i in accepted:
        text = samples[i].prompt
        if text not in prompt_ids:
            prompt_ids[text] = tokenizer.encode(
                format_prompt(tokenizer, text, instruction), add_special_tokens=False
            )
    responses = [
        tokenizer.encode(samples[i].response, add_special_tokens=False)
        + ([] if samples[i].truncated else [tokenizer.eos_token_id])
        for i in accepted
    ]
    norms = sequence_grad_norms(
        model,
        [prompt_ids[samples[i].prompt] for i in accepted],
        responses,
        tokenizer.pad_token_id,
        params,
        batch_size=args.batch_size,
    )
    grad_norms = [float("nan")] * len(samples)
    for i, norm in zip(accepted, norms.tolist()):
        grad_norms[i] = norm
    stats = prompt_stats(
        [s.prompt_id for s in samples],
        [s.score for s in samples],
        grad_norms,
        accept_threshold=threshold,
    )
    write_jsonl(args.output, stats.rows())
    print(
        f"{len(stats.prompt_ids)} prompts, {len(samples)} samples, {len(accepted)} accepted; "
        f"mean accept rate {stats.accept_rate.mean():.3f}; wrote {args.output}",
        file=sys.stderr,
    )
    return 0
