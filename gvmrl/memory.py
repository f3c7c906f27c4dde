"""GPU memory plan of a training run, from its config alone (nothing loaded, no GPU needed).

Parameter, gradient and optimizer bytes are exact: the parameters are counted on the `meta`
device from the model's config (shipped in gvmrl/model_configs for the paper's models, so
`gvmrl plan` works offline). Activations are an estimate per token of the training forward pass
(what autograd saves for the backward), counted from the layer's tensors:

    per decoder layer:  4 r h            the two RMSNorms' inputs and normalised outputs
                      + 5 c h            q and k after RoPE, v (GQA heads repeated), attention
                                         output and o_proj's input
                      + 5 c h            (autocast only) the compute-dtype copies of the norms'
                                         outputs that q/k/v and gate/up each cast and keep
                      + 4 c i            MLP: gate, SiLU(gate), up, their product
    outside layers:     3 r h            final norm input and output, the output layer's rows

with h the hidden size, i the MLP size, r the bytes of the residual stream (the parameter dtype:
fp32 master weights keep it fp32 under autocast) and c of the compute dtype. The output layer's
logits are never kept (`gvmrl.batching.token_logprobs` recomputes them in chunks). With gradient
checkpointing only each layer's input stays (L r h + 3 r h per token), and the backward
recomputes one layer at a time, adding one layer's full activations for the micro-batch.
tests/test_memory.py checks the estimate against the bytes autograd saves on small Qwen2 models
(within 30%). Transient buffers (a logits chunk, the allocator's fragmentation) are a fixed
allowance, not a per-token figure. While sampling, vLLM holds its `gpu_memory_utilization`
share; the HF engine holds the KV cache of `rollout.batch_size` sequences (exact bytes,
tests/test_memory.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gvmrl.config import ConfigError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from gvmrl.config import TrainConfig

GIB = 2**30
# Model configs shipped in gvmrl/model_configs, by the hub id a config's `model` names.
SHIPPED_MODEL_CONFIGS = {
    "Qwen/Qwen2.5-Math-1.5B": "qwen2.5-math-1.5b.json",
    "Qwen/Qwen2.5-Math-7B": "qwen2.5-math-7b.json",
}
PROMPT_TOKENS = 512  # assumed longest prompt (chat template + problem) when planning lengths
TRANSIENT_BYTES = 2 * GIB  # logits chunk and its gradient, CUDA context, allocator slack
VLLM_SLEEPING_BYTES = GIB // 2  # what a sleeping vLLM keeps on the GPU (buffers, CUDA graphs)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def load_model_config(name_or_path: str) -> PretrainedConfig:
    """The transformers config of `name_or_path` without weights or network: a shipped config, a
    local checkpoint directory's config.json, or the built-in model's."""
    from transformers import AutoConfig, Qwen2Config

    if name_or_path in SHIPPED_MODEL_CONFIGS:
        text = (
            resources.files("gvmrl.model_configs")
            .joinpath(SHIPPED_MODEL_CONFIGS[name_or_path])
            .read_text()
        )
        values = {k: v for k, v in json.loads(text).items() if not k.startswith("_")}
        return Qwen2Config(**values)
    if name_or_path == "builtin":
        from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer

        return builtin_model_config(builtin_tokenizer())
    if (Path(name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(name_or_path)
    raise ConfigError(
        f"model: no config for {name_or_path!r} offline; give a local checkpoint directory "
        f"or one of {sorted(SHIPPED_MODEL_CONFIGS)}"
    )


def count_parameters(model_config: PretrainedConfig) -> int:
    """Exact number of distinct parameters (tied embeddings once), built on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Shape:
    """What the activation estimate needs from a decoder-only model config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @staticmethod
    def of(model_config: PretrainedConfig) -> Shape:
        c = model_config
        return Shape(
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers,
            c.num_attention_heads,
            getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            c.vocab_size,
        )


def layer_activation_bytes(shape: Shape, param_bytes: int, compute_bytes: int) -> int:
    """Bytes per token one decoder layer saves for the backward (module docstring)."""
    h, i = shape.hidden, shape.intermediate
    autocast = compute_bytes != param_bytes
    return 4 * param_bytes * h + (10 if autocast else 5) * compute_bytes * h + 4 * compute_bytes * i


def kv_cache_bytes_per_token(shape: Shape, compute_bytes: int) -> int:
    """Keys and values of one position over all layers, in the compute dtype (vLLM's cache, and
    the HF engine's, which stores autocast's fp32 keys cast: gvmrl.rollout.hf)."""
    head_dim = shape.hidden // shape.heads
    return 2 * shape.layers * shape.kv_heads * head_dim * compute_bytes


def activation_bytes_per_token(
    shape: Shape, param_bytes: int, compute_bytes: int, checkpointing: bool
) -> int:
    """Bytes per token autograd keeps between forward and backward (module docstring)."""
    outside = 3 * param_bytes * shape.hidden
    if checkpointing:
        return shape.layers * param_bytes * shape.hidden + outside
    return shape.layers * layer_activation_bytes(shape, param_bytes, compute_bytes) + outside


def peak_activation_bytes(
    shape: Shape, param_bytes: int, compute_bytes: int, checkpointing: bool, tokens: int
) -> int:
    """Activation memory of a micro-batch of `tokens` (padded) tokens at its backward's peak."""
    kept = activation_bytes_per_token(shape, param_bytes, compute_bytes, checkpointing) * tokens
    if checkpointing:  # the layer being recomputed holds its full activations
        kept += layer_activation_bytes(shape, param_bytes, compute_bytes) * tokens
    return kept


@dataclass
class MemoryPlan:
    """Estimated GPU bytes of each part of a run, and what fits in `gpu_bytes`."""

    parameters: int
    param_bytes: int
    compute_bytes: int
    weights: int
    gradients: int
    optimizer: int
    compute_weight_copies: int
    reference: int
    vllm_awake: int
    vllm_weights: int
    vllm_kv_cache: int
    vllm_kv_tokens: int
    vllm_during_update: int
    hf_kv_cache: int
    activation_per_token: int
    activation_per_token_checkpointed: int
    activation_per_token_recompute: int
    micro_batch_tokens: int
    micro_batch_activations: int
    gpu_bytes: int
    gradient_checkpointing: bool

    @property
    def update_fixed(self) -> int:
        """Everything on the GPU during the update except the micro-batch's activations."""
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.compute_weight_copies
            + self.reference
            + self.vllm_during_update
            + TRANSIENT_BYTES
        )

    @property
    def update_peak(self) -> int:
        return self.update_fixed + self.micro_batch_activations

    @property
    def rollout_peak(self) -> int:
        """While the engine samples: weights and optimizer state stay, gradients were freed."""
        engine = self.vllm_awake + self.hf_kv_cache
        return self.weights + self.optimizer + self.reference + engine + TRANSIENT_BYTES

    @property
    def largest_micro_batch_tokens(self) -> int:
        """Most padded tokens per update micro-batch that fit next to `update_fixed`."""
        per_token = self.activation_per_token_checkpointed_peak
        return max(0, (self.gpu_bytes - self.update_fixed) // per_token)

    @property
    def activation_per_token_checkpointed_peak(self) -> int:
        if self.gradient_checkpointing:
            return self.activation_per_token_checkpointed + self.activation_per_token_recompute
        return self.activation_per_token

    def rows(self) -> list[tuple[str, float]]:
        """(part, GiB) for printing."""
        return [
            ("parameters (count, billions)", self.parameters / 1e9),
            ("weights (master)", self.weights / GIB),
            ("gradients", self.gradients / GIB),
            ("optimizer state (AdamW m, v)", self.optimizer / GIB),
            ("compute-dtype weight copies (autocast)", self.compute_weight_copies / GIB),
            ("reference model", self.reference / GIB),
            ("vLLM while sampling (gpu_memory_utilization)", self.vllm_awake / GIB),
            ("  of it vLLM weights", self.vllm_weights / GIB),
            ("  of it vLLM KV cache", self.vllm_kv_cache / GIB),
            ("vLLM during the update", self.vllm_during_update / GIB),
            ("HF engine KV cache (rollout.batch_size sequences)", self.hf_kv_cache / GIB),
            ("activations per token, no checkpointing (MiB)", self.activation_per_token / 2**20),
            (
                "activations per token, checkpointing (MiB)",
                self.activation_per_token_checkpointed / 2**20,
            ),
            ("update micro-batch (tokens)", self.micro_batch_tokens),
            ("update micro-batch activations", self.micro_batch_activations / GIB),
            ("transient allowance", TRANSIENT_BYTES / GIB),
            ("peak while sampling", self.rollout_peak / GIB),
            ("peak during the update", self.update_peak / GIB),
            ("GPU memory", self.gpu_bytes / GIB),
            ("largest update micro-batch that fits (tokens)", self.largest_micro_batch_tokens),
        ]


def sequence_tokens(config: TrainConfig) -> int:
    """Planned length of the longest prompt plus response."""
    return PROMPT_TOKENS + config.rollout.max_new_tokens


def micro_batch_tokens(config: TrainConfig) -> int:
    """Padded tokens of the largest update micro-batch the config allows."""
    if config.update.max_tokens_per_micro_batch is not None:
        return config.update.max_tokens_per_micro_batch
    return config.update.micro_batch_size * sequence_tokens(config)


def plan_memory(
    config: TrainConfig, gpu_memory_gib: float, model_config: PretrainedConfig | None = None
) -> MemoryPlan:
    """The memory plan of `config` on a GPU of `gpu_memory_gib` GiB (CUDA precision rules)."""
    from gvmrl.precision import resolve_precision

    model_config = model_config or load_model_config(config.model)
    shape = Shape.of(model_config)
    n = count_parameters(model_config)
    precision = resolve_precision(config.dtype, config.compute_dtype, "cuda")
    p = DTYPE_BYTES[str(precision.param_dtype).removeprefix("torch.")]
    c = DTYPE_BYTES[str(precision.compute_dtype).removeprefix("torch.")]
    gpu = int(gpu_memory_gib * GIB)
    vllm = config.rollout.engine == "vllm"
    v = config.rollout.vllm
    vllm_awake = int(config.rollout.gpu_memory_utilization * gpu) if vllm else 0
    vllm_weights = n * c if vllm else 0
    kv_per_token = kv_cache_bytes_per_token(shape, c)
    kv_cache = max(0, vllm_awake - vllm_weights - GIB) if vllm else 0  # ~1 GiB vLLM workspace
    # the HF engine preallocates each batch's cache for its longest prompt plus max_new_tokens
    hf_kv_cache = 0 if vllm else config.rollout.batch_size * sequence_tokens(config) * kv_per_token
    if not vllm:
        during_update = 0
    elif v.enable_sleep_mode:
        during_update = VLLM_SLEEPING_BYTES
    else:
        during_update = vllm_awake
    tokens = micro_batch_tokens(config)
    checkpointing = config.gradient_checkpointing
    per_token_ckpt = activation_bytes_per_token(shape, p, c, checkpointing=True)
    return MemoryPlan(
        parameters=n,
        param_bytes=p,
        compute_bytes=c,
        weights=n * p,
        gradients=n * p,
        optimizer=2 * n * p,
        compute_weight_copies=n * c if c != p else 0,
        reference=n * c if config.loss.kl_coef > 0 else 0,
        vllm_awake=vllm_awake,
        vllm_weights=vllm_weights,
        vllm_kv_cache=kv_cache,
        vllm_kv_tokens=kv_cache // kv_per_token if vllm else 0,
        vllm_during_update=during_update,
        hf_kv_cache=hf_kv_cache,
        activation_per_token=activation_bytes_per_token(shape, p, c, checkpointing=False),
        activation_per_token_checkpointed=per_token_ckpt,
        activation_per_token_recompute=layer_activation_bytes(shape, p, c),
        micro_batch_tokens=tokens,
        micro_batch_activations=peak_activation_bytes(shape, p, c, checkpointing, tokens),
        gpu_bytes=gpu,
        gradient_checkpointing=checkpointing,
    )


def plan_fits(config: TrainConfig, gpu_memory_gib: float | None = None) -> MemoryPlan | None:
    """Stop before anything loads when `config` cannot fit the GPU (ConfigError naming the key
    to change); the trainer calls it at start. None on CPU runs (no GPU to plan for)."""
    if gpu_memory_gib is None:
        import torch

        if config.device == "cpu" or not torch.cuda.is_available():
            return None
        gpu = torch.device(config.device) if config.device.startswith("cuda:") else None
        gpu_memory_gib = torch.cuda.get_device_properties(gpu).total_memory / GIB  # None: current
    plan = plan_memory(config, gpu_memory_gib)
    if plan.rollout_peak > plan.gpu_bytes:
        engine = plan.vllm_awake + plan.hf_kv_cache  # one of the two is 0
        if config.rollout.engine == "hf":
            key = "rollout.batch_size"
            what = (
                f"the HF engine's KV cache for {config.rollout.batch_size} sequences of up to "
                f"{sequence_tokens(config)} tokens ({engine / GIB:.1f} GiB)"
            )
        else:
            key, what = "rollout.gpu_memory_utilization", f"vLLM's {engine / GIB:.1f} GiB"
        trainer = (plan.rollout_peak - engine) / GIB
        raise ConfigError(
            f"{key}: {what} plus the trainer's weights and optimizer state ({trainer:.1f} GiB) "
            f"exceed the GPU's {gpu_memory_gib:.0f} GiB; lower it (see `gvmrl plan`)"
        )
    if plan.update_peak > plan.gpu_bytes:
        largest = plan.largest_micro_batch_tokens
        hint = "" if config.gradient_checkpointing else " or set gradient_checkpointing: true"
        raise ConfigError(
            f"update.max_tokens_per_micro_batch: a micro-batch of {plan.micro_batch_tokens} "
            f"tokens needs {plan.micro_batch_activations / GIB:.1f} GiB of activations next to "
            f"{plan.update_fixed / GIB:.1f} GiB of weights, gradients, optimizer state and vLLM; "
            f"the GPU has {gpu_memory_gib:.0f} GiB. Set it to at most {largest}{hint} "
            "(see `gvmrl plan`)"
        )
    return plan


def format_plan(plan: MemoryPlan) -> str:
    lines = []
    for name, value in plan.rows():
        text = f"{value:,.0f}" if name.endswith("(tokens)") else f"{value:.2f}"
        lines.append(f"{name:<48} {text:>10}")
    return "\n".join(lines)


def plan_dict(plan: MemoryPlan) -> dict[str, Any]:
    """JSON-ready figures (GiB unless named otherwise)."""
    return {name: (round(v, 4) if isinstance(v, float) else v) for name, v in plan.rows()}
