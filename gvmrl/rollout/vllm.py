"""Rollouts with vLLM (optional extra: `pip install gvmrl[vllm]`), targeting vllm 0.33 (V1 engine).

The engine is colocated with the trainer in the same process and GPU: vLLM keeps its own copy
of the weights, and `sync_weights` copies the training model's state dict into it through
`LLM.apply_model` (public since vLLM 0.9; it runs a function on the model inside each worker,
here `model.load_weights(...)`, the loader vLLM uses for checkpoints), then drops the prefix
cache, whose entries were computed with the old weights. `VLLM_ENABLE_V1_MULTIPROCESSING=0` is
set (unless the user set it) so the worker lives in this process and the weights are handed
over without serialisation, as TRL's colocate mode does.

Log-probs: the engine is created with `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2), so
the returned log-probs are those of the distribution after temperature and top-p, the one the
tokens were drawn from, as the HF engine returns (vLLM's default is the raw model's).

Seeding: prompt i samples with seed + i (its n samples then differ from each other, and equal
prompts at different indices get different samples). vLLM is not bit-reproducible across batch
compositions on a GPU; equal requests with a seed give equal samples in practice.

No test of this module runs without CUDA and vllm (tests/test_rollout.py skips it).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from gvmrl.rollout.base import Sample, SamplingParams, check_request, eos_token_ids


class VLLMEngine:
    """Rollout engine over an in-process `vllm.LLM`, with weights synced from the training model.

    Args:
        model: the training policy; its weights are loaded into vLLM at construction.
        tokenizer: its tokenizer (prompts are encoded without adding special tokens).
        model_path: checkpoint directory or hub id vLLM reads the architecture from (default:
            `model.config._name_or_path`); its weights are replaced by `model`'s.
        max_batch_sequences: vLLM's `max_num_seqs`.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache); leave
            room for the training model, its gradients and optimizer state.
        llm_options: further `vllm.LLM` arguments (e.g. `max_model_len`, `enforce_eager`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_path: str | None = None,
        max_batch_sequences: int = 256,
        gpu_memory_utilization: float = 0.4,
        **llm_options: Any,
    ):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as e:
            raise ImportError("the vllm engine needs the extra: pip install 'gvmrl[vllm]'") from e

        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_token_ids(model, tokenizer))
        self.llm = LLM(
            model=model_path or model.config._name_or_path,
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            max_num_seqs=max_batch_sequences,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **llm_options,
        )
        self.sync_weights(model)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Copy `model`'s current weights into the vLLM engine."""
        weights = [(name, tensor.detach()) for name, tensor in model.state_dict().items()]
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        self.llm.reset_prefix_cache()

    def generate(
        self, prompts: Sequence[str], num_samples: Sequence[int], params: SamplingParams
    ) -> list[Sample]:
        """Samples ordered by prompt then sample; num_samples[i] == 0 gives none for prompt i."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        check_request(prompts, num_samples)
        requested = [i for i, n in enumerate(num_samples) if n > 0]
        prompt_ids = {
            i: self.tokenizer.encode(prompts[i], add_special_tokens=False) for i in requested
        }
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in requested],
            [
                VLLMSamplingParams(
                    n=num_samples[i],
                    temperature=params.temperature,
                    top_p=params.top_p,
                    max_tokens=params.max_new_tokens,
                    stop=list(params.stop),
                    stop_token_ids=self.eos_ids,
                    include_stop_str_in_output=True,  # text ends with the stop string, as in HF
                    skip_special_tokens=True,
                    seed=None if params.seed is None else params.seed + i,
                    logprobs=0,  # the sampled token's log-prob only
                )
                for i in requested
            ],
            use_tqdm=False,
        )
        samples = []
        for i, output in zip(requested, outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                token_ids = list(completion.token_ids)
                steps = completion.logprobs  # per token: {token id: Logprob}
                samples.append(
                    Sample(
                        prompt_index=i,
                        prompt_ids=prompt_ids[i],
                        response_ids=token_ids,
                        text=completion.text,
                        logprobs=[step[t].logprob for t, step in zip(token_ids, steps)],
                        finish_reason="length" if completion.finish_reason == "length" else "stop",
                    )
                )
        return samples
