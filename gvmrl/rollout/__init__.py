"""Rollout engines behind one Protocol: `make_engine("hf" | "vllm", model, tokenizer, **options)`.

Engine modules are imported by `make_engine` on first use, so importing this package pulls in
neither transformers nor vLLM.
"""

from gvmrl.rollout.base import (
    ENGINES,
    RolloutEngine,
    Sample,
    SamplingParams,
    make_engine,
)

__all__ = ["ENGINES", "RolloutEngine", "Sample", "SamplingParams", "make_engine"]
