"""The one narrow interface every rollout engine implements, and the engine registry.

A trainer asks an engine for `num_samples[i]` completions of `prompts[i]` and gets back, for
each completion, its token ids, text, per-token log-probs under the *sampling* distribution
(temperature and top-p applied, the distribution the tokens were actually drawn from) and why
it ended. Engines differ only in how they produce these (a custom HF loop on the training model
itself, or vLLM with weights synced from it); the trainer never switches on the engine name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; shared by every engine so that a run can switch engines by name."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy decoding (every log-prob is then 0)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to >= top_p."""
    max_new_tokens: int = 256
    """Response length cap; a response that reaches it ends with finish_reason "length"."""
    stop: tuple[str, ...] = ()
    """Strings that end a response (kept in it, nothing after), besides the EOS token(s)."""
    seed: int | None = None
    """Base seed of the request: sample k of prompt i gets `sample_seeds(seed, i, k)`, unless
    generate() is given explicit per-sample seeds; None draws the base from torch's global RNG."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")


@dataclass
class Sample:
    """One completion of one prompt."""

    prompt_index: int
    """Index into the `prompts` list given to generate()."""
    prompt_ids: list[int]
    response_ids: list[int]
    """Generated ids: EOS included when produced; the token completing a stop string is the last."""
    text: str
    """Decoded response, special tokens skipped; ends with the stop string when one matched."""
    logprobs: list[float]
    """Per response token, log-prob under the sampling distribution (len == len(response_ids))."""
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_new_tokens reached)."""


class RolloutEngine(Protocol):
    """What the trainer and the evaluator need from a sampler."""

    def generate(
        self,
        prompts: Sequence[str],
        num_samples: Sequence[int],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Samples ordered by prompt then sample; num_samples[i] == 0 gives none for prompt i.

        `seeds`: one per requested sample, in prompt-then-sample order (default:
        `request_seeds`). A sample's tokens depend only on its prompt, its seed and the weights,
        never on the other samples of the request or how the engine batches them.
        """
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...


# name -> "module:factory"; modules are imported on first use so that vLLM stays optional.
ENGINES: dict[str, str] = {
    "hf": "gvmrl.rollout.hf:HFEngine",
    "vllm": "gvmrl.rollout.vllm:VLLMEngine",
}


def make_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> RolloutEngine:
    """Build the engine registered as `name` around the training `model` and its `tokenizer`.

    `options` go to the engine's constructor (e.g. `max_batch_sequences` for "hf",
    `gpu_memory_utilization` for "vllm").
    """
    if name not in ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; choose one of {sorted(ENGINES)}")
    module_name, factory_name = ENGINES[name].split(":")
    factory: Callable[..., RolloutEngine] = getattr(
        importlib.import_module(module_name), factory_name
    )
    return factory(model, tokenizer, **options)


def check_request(prompts: Sequence[str], num_samples: Sequence[int]) -> None:
    """Reject a malformed generate() request before any compute is spent on it."""
    if len(prompts) != len(num_samples):
        raise ValueError(
            f"got {len(prompts)} prompts but {len(num_samples)} sample counts; they must match"
        )
    if any(n < 0 for n in num_samples):
        raise ValueError("sample counts must be >= 0")


def request_seeds(
    num_samples: Sequence[int], params: SamplingParams, seeds: Sequence[int] | None = None
) -> list[int]:
    """The seed of each requested sample, in prompt-then-sample order.

    Explicit `seeds` are checked and returned; otherwise sample k of prompt i gets
    `dealing.sample_seeds(params.seed, i, k)`, the seed a distributed run gives it from its
    global (prompt, k), so a plain run and a K-rank run draw the same samples. Without a
    `params.seed` the base seed comes from torch's global RNG (`torch.manual_seed` fixes it).
    """
    from gvmrl.distributed.dealing import sample_indices, sample_seeds

    total = sum(num_samples)
    if seeds is not None:
        seeds = [int(s) for s in seeds]
        if len(seeds) != total:
            raise ValueError(f"got {len(seeds)} seeds for {total} requested samples")
        if any(not 0 <= s < 2**64 for s in seeds):
            raise ValueError("seeds must be in [0, 2^64)")
        return seeds
    base = params.seed
    if base is None:
        import torch

        base = int(torch.randint(0, 2**62, (1,)).item())
    return [int(x) for x in sample_seeds(base, *sample_indices(num_samples))]


def cut_at_stop(text: str, stop: Sequence[str]) -> int | None:
    """End index (exclusive) of the earliest-ending stop string in `text`, or None.

    The earliest *end* decides, because generation checks after every token and would have
    stopped as soon as any stop string was complete.
    """
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return min(ends) if ends else None


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation config's.

    `gvmrl.models.load_model_and_tokenizer` puts every end-of-turn id (e.g. `<|im_end|>` beside
    `<|endoftext|>`) in the generation config, as an int or a list.
    """
    ids: set[int] = set()
    generation_config = getattr(model, "generation_config", None)
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(value)
    if not ids:
        raise ValueError("neither the tokenizer nor the generation config names an EOS token")
    return ids
