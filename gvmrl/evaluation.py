"""Accuracy and unbiased pass@k of a policy on a prompt set.

For each prompt the engine draws `samples` responses, the grader scores each 0 or 1, and
- accuracy is the mean score over all prompts and samples (mean accept rate);
- pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1) is the
  mean over prompts of the unbiased estimate 1 - C(n-c, k) / C(n, k) from n samples of which c
  are correct, for k = 1, 2, 4, ... up to n.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from gvmrl.data import format_prompt
from gvmrl.distributed.dealing import sample_indices, sample_seeds
from gvmrl.progress import Progress
from gvmrl.records import PromptRecord
from gvmrl.rollout.base import RolloutEngine, Sample, SamplingParams

# Sequences per engine call when the caller does not choose: one CPU-sized batch, and a
# progress-bar tick every few seconds on the built-in model.
DEFAULT_SEQUENCES_PER_CALL = 512


class BatchGrader(Protocol):
    """What `evaluate` needs from `gvmrl.verify.Grader`."""

    def grade_many(self, responses: Sequence[str], answers: Sequence[Any]) -> list[Any]:
        """One result with a `.score` (0.0 or 1.0) and a `.pred` per (response, answer)."""
        ...


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials; it is 1 when
    fewer than k samples are wrong (every k-subset then holds a correct one).
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def pass_k_values(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to `samples`: the pass@k columns reported."""
    return [1 << e for e in range(samples.bit_length()) if 1 << e <= samples]


@dataclass
class EvalResult:
    """Scores of one prompt set."""

    accuracy: float
    """Mean score over every prompt and sample."""
    pass_at_k: dict[int, float]
    """k -> mean over prompts of the unbiased pass@k estimate."""
    rows: list[dict[str, Any]]
    """Per prompt: id, answer, accept_rate, and per sample scores, preds, responses,
    finish_reasons, response_tokens."""
    mean_response_tokens: float
    truncated_fraction: float
    """Share of responses that hit max_new_tokens (finish_reason "length")."""

    def summary(self) -> dict[str, Any]:
        """Everything but the rows, JSON-ready (pass@k keys as `pass@k`)."""
        return {
            "prompts": len(self.rows),
            "accuracy": self.accuracy,
            **{f"pass@{k}": v for k, v in self.pass_at_k.items()},
            "mean_response_tokens": self.mean_response_tokens,
            "truncated_fraction": self.truncated_fraction,
        }


def evaluate(
    engine: RolloutEngine,
    tokenizer: Any,
    records: Sequence[PromptRecord],
    *,
    samples: int,
    params: SamplingParams,
    grader: BatchGrader,
    instruction: str | None,
    progress: bool = False,
    prompts_per_call: int | None = None,
    label: str = "eval",
    first_record_index: int = 0,
) -> EvalResult:
    """Sample `samples` responses per record, grade them, and aggregate accuracy and pass@k.

    Prompts go to the engine in groups of `prompts_per_call` (default: about 512 sequences per
    call); with a seed, sample k of record p has seed `sample_seeds(seed, p, k)`, so the
    evaluation is reproducible and the same however the records are grouped into calls. A rank
    evaluating the slice of a record set that starts at record j passes
    `first_record_index=j`: its samples are then those of the whole set's evaluation.
    `progress` shows a bar (per prompt) named `label`.
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not records:
        raise ValueError("no prompts to evaluate")
    group = prompts_per_call or max(1, DEFAULT_SEQUENCES_PER_CALL // samples)
    prompts = [format_prompt(tokenizer, r.problem, instruction) for r in records]
    if progress:
        with Progress() as bar:
            task = bar.phase(f"{label}: sample {samples} per prompt", total=len(prompts))
            generated = _sample_groups(
                engine,
                prompts,
                samples,
                params,
                group,
                first_record_index,
                lambda n: bar.advance(task, n),
            )
            bar.end(task)
    else:
        generated = _sample_groups(
            engine, prompts, samples, params, group, first_record_index, lambda n: None
        )
    grades = grader.grade_many(
        [s.text for s in generated], [records[i // samples].answer for i in range(len(generated))]
    )
    rows = []
    for p, record in enumerate(records):
        mine = range(p * samples, (p + 1) * samples)
        scores = [float(grades[i].score) for i in mine]
        rows.append(
            {
                "id": record.id,
                "answer": record.answer,
                "accept_rate": sum(scores) / samples,
                "scores": scores,
                "preds": [grades[i].pred for i in mine],
                "responses": [generated[i].text for i in mine],
                "finish_reasons": [generated[i].finish_reason for i in mine],
                "response_tokens": [len(generated[i].response_ids) for i in mine],
            }
        )
    accuracy, pass_at = summarise_correct([round(sum(row["scores"])) for row in rows], samples)
    return EvalResult(
        accuracy=accuracy,
        pass_at_k=pass_at,
        rows=rows,
        mean_response_tokens=sum(len(s.response_ids) for s in generated) / len(generated),
        truncated_fraction=sum(s.finish_reason == "length" for s in generated) / len(generated),
    )


def summarise_correct(correct: Sequence[int], samples: int) -> tuple[float, dict[int, float]]:
    """(accuracy, pass@k for k in `pass_k_values`) of prompts with `correct[p]` of `samples`
    responses correct: what `evaluate` reports, and what a job's ranks report from the per-prompt
    counts of their slices."""
    accuracy = sum(correct) / (len(correct) * samples)
    return accuracy, {
        k: sum(pass_at_k(samples, c, k) for c in correct) / len(correct)
        for k in pass_k_values(samples)
    }


def _sample_groups(
    engine: RolloutEngine,
    prompts: list[str],
    samples: int,
    params: SamplingParams,
    group: int,
    first_index: int,
    on_group_done: Callable[[int], None],
) -> list[Sample]:
    """`samples` responses per prompt, `group` prompts per engine call; with a seed, each sample
    seeded from its (first_index + index in `prompts`, k)."""
    generated: list[Sample] = []
    for start in range(0, len(prompts), group):
        chunk = prompts[start : start + group]
        seeds = None
        if params.seed is not None:
            prompt, k = sample_indices([samples] * len(chunk))
            seeds = sample_seeds(params.seed, first_index + start + prompt, k).tolist()
        generated += engine.generate(chunk, [samples] * len(chunk), params, seeds)
        on_group_done(len(chunk))
    return generated
