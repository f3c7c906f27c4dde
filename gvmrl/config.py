"""The one typed configuration of a training run: dataclasses, YAML files and `--set` overrides.

    config = load_config("configs/builtin-raftpp-gvm.yaml", ["iterations=20", "gvm.presamples=4"])

Every field has a type, a default and a one-line doc. Unknown keys and values of the wrong type
fail before any work with a message naming the key; combinations that cannot work fail in
`validate`. The resolved config is saved as DIR/config.yaml beside every run's outputs.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gvmrl.io import InputError, read_text, write_text

# Update settings measured to improve the built-in warm start (BENCHMARKS.md), used by `gvmrl demo`,
# configs/builtin-*.yaml and bench/convergence.py: lr 1e-4 with warm-up and AdamW beta2 = 0.95,
# mini-batches of whole prompts. Larger steps (lr >= 3e-4, or 8-prompt mini-batches with
# beta2 = 0.999) lowered held-out accuracy there, even on reference solutions.
BUILTIN_RECIPE = [
    "optim.lr=1e-4",
    "optim.betas=[0.9,0.95]",
    "optim.warmup_steps=10",
    "update.minibatch_by=prompts",
    "reward=answer+arithmetic",  # see gvmrl.rewards: lucky final answers are common on this task
]


@dataclass
class DataConfig:
    """Where prompts come from and how they become model inputs."""

    preset: str | None = None
    """Dataset preset for train/eval files (math, gsm8k, numina, olympiadbench); None: plain
    fields."""
    problem_field: str = "problem"
    """Field holding the problem text (when no preset)."""
    answer_field: str = "answer"
    """Field holding the reference answer (when no preset)."""
    instruction: str | None = "auto"
    """Appended to each problem; "auto": none for the built-in model (and checkpoints trained
    from it), the \\boxed{} instruction otherwise."""
    eval_limit: int | None = 128
    """Evaluate on the first K held-out prompts (None: all)."""
    train_limit: int | None = None
    """Train on the first K training prompts only (None: all): a finite set whose prompts recur
    every K / prompts_per_iteration iterations, as allocation rules with history need."""
    overlong: str = "skip"
    """Prompts whose tokens plus rollout.max_new_tokens exceed the model's context: skip (counted)
    or error (stop before any work, naming the prompt)."""


@dataclass
class VLLMConfig:
    """Options of the vLLM engine (rollout.engine: vllm), passed to `vllm.LLM`; gvmrl sets the
    model, dtype (the compute dtype), seed, gpu_memory_utilization and log-prob mode itself."""

    max_model_len: int | None = None
    """Longest prompt + response vLLM plans its KV cache for (None: the model's context length)."""
    max_num_seqs: int = 256
    """Most sequences vLLM decodes at once."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture: less memory and a faster start, slower decoding."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of a prompt across its samples."""
    enable_sleep_mode: bool = True
    """Free vLLM's GPU memory after each rollout phase and take it back before the next, so the
    update has the GPU (vLLM sleep mode; weights are reloaded from the trainer on wake-up). On a
    GPU only: vLLM's CPU build has no sleep mode."""
    sleep_level: int = 2
    """1: weights offloaded to CPU RAM and KV cache dropped; 2: both dropped (the weights are
    reloaded from the trainer after wake-up anyway, so level 2 saves the copy and the RAM)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Further `vllm.LLM` keyword arguments, named as `vllm.EngineArgs` fields (e.g.
    {kv_cache_dtype: fp8}); an unknown name fails at validation."""


@dataclass
class RolloutConfig:
    """Sampling of responses."""

    engine: str = "hf"
    """Rollout engine: hf (transformers generate, CPU or GPU) or vllm (optional extra: GPU, or
    vLLM's CPU build)."""
    temperature: float = 1.0
    """Sampling temperature for training samples and pre-samples."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    max_new_tokens: int = 96
    """Response length limit (the paper uses 3072 on Qwen2.5-Math)."""
    batch_size: int = 512
    """Sequences per generation batch (HF engine)."""
    gpu_memory_utilization: float = 0.5
    """Share of GPU memory vLLM may take (it shares the GPU with training); with vLLM's CPU build,
    the share of the machine's RAM for all its ranks' engines together."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class GVMConfig:
    """Stage 1-2 of GVM: pre-sampling, per-prompt statistics and the allocation rule."""

    presamples: int = 8
    """N': pre-samples per prompt used to estimate accept rate p_i and gradient norm G_i."""
    budget: int | None = None
    """N: samples per iteration; None: presamples x prompts (the paper), or with budget_inclusive
    samples_per_prompt x prompts (what uniform allocation generates)."""
    alpha: float = 1e-3
    """Regulariser weight in n_i ~ G_i / sqrt(p_i + alpha / p_i^(beta-1))."""
    beta: float = 2.0
    """Regulariser exponent."""
    min_size: int = 0
    """Floor on n_i for prompts that get samples at all."""
    max_size: int | None = None
    """Cap on n_i; the excess is redistributed (water-filling)."""
    drop_above: float | None = None
    """Give 0 samples to prompts with p_i above this."""
    min_expected_accepts: float | None = None
    """Give 0 samples to prompts expecting fewer accepted samples than this."""
    uniform_share: float = 0.0
    """Share of the budget spread evenly over all prompts, the rest by the GVM rule: keeps
    samples on prompts whose few pre-samples happened to all fail (0: the paper's rule)."""
    reuse_presamples: bool = False
    """Also train on the pre-samples (the paper does not)."""
    budget_inclusive: bool = False
    """Pre-samples count toward N and are all trained on; only N - N' x prompts is allocated."""
    accept_prior: tuple[float, float] = (0.0, 0.0)
    """Beta(a, b) prior for p_i = (accepted + a) / (N' + a + b); helps small N' (e.g. (1, 1))."""
    grad_params: str = "embed_tokens"
    """Parameter group of the gradient norm G_i: embed_tokens (the paper's) or lm_head."""
    grad_norm_samples: int | None = None
    """G_i from at most this many accepted pre-samples per prompt (None: all of them). A prompt's
    accepted samples have similar norms (bench/variance.py), and on a CPU the exact norms can cost
    as much time as the pre-sampling itself."""
    grad_batch_size: int = 64
    """Micro-batch size of the gradient-norm estimation."""


@dataclass
class GVMHistoryConfig:
    """allocation: gvm-history. GVM's rule (the `gvm` section's alpha, beta, caps, filters,
    uniform_share, grad-norm and pre-sample options) on p_i and G_i carried from each prompt's
    earlier visits, so a recurring prompt needs no pre-samples (gvmrl.allocation_rules.history)."""

    decay: float = 1.0
    """Weight of the past per visit in the averaged statistics (1: pool every visit, 0: last)."""
    accept_prior: tuple[float, float] = (1.0, 1.0)
    """Beta(a, b) prior smoothing p_i = (accepted + a) / (samples + a + b) over the history."""
    unseen: str = "presample"
    """A prompt never seen: presample (gvm.presamples pre-samples, counted as generated) or prior
    (p = unseen_accept_rate, G = the median G of the batch's known prompts)."""
    unseen_accept_rate: float = 0.5
    """p of an unseen prompt under unseen: prior."""


@dataclass
class KnapsackConfig:
    """allocation: knapsack. Knapsack-RL (arXiv 2509.25849): each prompt's value of n samples
    from its success rate in earlier visits, solved as a knapsack over samples_per_prompt x
    prompts (gvmrl.allocation_rules.knapsack)."""

    min_size: int = 2
    """Floor of a prompt with a known 0 < p < 1 (the knapsack adds to it)."""
    max_size: int = 128
    """Cap of a prompt in the knapsack."""
    zero_size: int | None = None
    """Samples of a known prompt with p = 0 (None: min_size)."""
    one_size: int | None = None
    """Samples of a known prompt with p = 1 (None: min_size)."""
    confidence: float = 0.9
    """Cost of a prompt: samples to see both outcomes with this probability."""
    cost_estimate: str = "probability"
    """probability (log(1 - confidence) / log(max(p, 1 - p))) or expectation (1 / (p(1-p)) - 1)."""
    redistribute_excess: bool = True
    """Budget the costs do not need goes to the prompts with p = 0 or unknown p (the authors')."""
    min_history_samples: int = 8
    """A prompt's p is known once this many of its samples were seen; before, it gets n."""
    decay: float = 0.0
    """Weight of the past per visit in p (0: the last visit only)."""


@dataclass
class DAPOConfig:
    """allocation: dapo. DAPO's dynamic sampling (arXiv 2503.14476): rounds of fresh prompts with
    samples_per_prompt samples each, groups whose rewards are all equal dropped, until
    prompts_per_iteration informative groups are in (gvmrl.allocation_rules.dapo). Also the
    rounds of greso."""

    gen_prompts: int | None = None
    """Prompts per round (the iteration's batch first, then further ones from the training set);
    None: 3 x prompts_per_iteration (DAPO's recipe)."""
    max_rounds: int = 10
    """Most rounds per iteration; then the iteration trains on the groups it has."""
    adaptive_rounds: bool = False
    """Size later rounds from the last one's informative share (GRESO's variant)."""
    headroom: float = 1.25
    """Adaptive rounds: draw this many times the prompts expected to fill the batch."""
    min_round_prompts: int = 8
    """Adaptive rounds: fewest prompts per round."""


@dataclass
class ReinforceAdaConfig:
    """allocation: reinforce-ada. Reinforce-Ada (arXiv 2510.04996): rounds of samples for the
    prompts still active, a prompt retired once its samples meet the exit rule; each trains on a
    balanced group (gvmrl.allocation_rules.reinforce_ada)."""

    exit_rule: str = "balanced"
    """balanced (group_size // 2 positives and the rest negatives seen) or positive_focused."""
    round_samples: int = 8
    """Samples per active prompt per round."""
    max_rounds: int = 4
    """Most rounds per iteration."""
    group_size: int | None = None
    """K, samples per prompt trained on (None: samples_per_prompt)."""
    positive_threshold: float = 0.7
    """A sample is positive if its reward is above this."""
    budget: int | None = None
    """Most samples per iteration over all rounds (None: round_samples x max_rounds x prompts)."""
    global_baseline: bool = True
    """Advantages against each prompt's mean (and std) over all its samples, not the group's."""


@dataclass
class GRESOConfig:
    """allocation: greso. GRESO (arXiv 2506.02177): skip prompts whose latest visits all had
    equal rewards, with a keep probability base^streak; the kept prompts feed the `dapo` rounds
    (gvmrl.allocation_rules.greso)."""

    initial_base: float = 0.5
    """Starting exploration bases p_easy and p_hard."""
    target_zero_variance: float = 0.25
    """Aimed share of generated groups with equal rewards (a third all-correct, two thirds
    all-wrong)."""
    step: float = 0.01
    """Change of a base per iteration towards its target."""
    base_range: tuple[float, float] = (0.05, 0.95)
    """Bounds of the bases."""
    min_keep: float = 0.01
    """Floor of a prompt's keep probability."""
    adapt_after_prompts: int | None = None
    """Adapt the bases once this many batch prompts were trained on (None: one epoch)."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate (on the built-in model RAFT++ at 3e-4 collapsed: BENCHMARKS.md)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warm-up, in optimizer steps."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: constant or cosine."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    max_skipped_steps: int = 3
    """Stop the run after this many optimizer steps in a row were skipped for a NaN/inf loss or
    gradient norm (gvmrl.guards)."""


@dataclass
class LossConfig:
    """The M-step objective."""

    aggregation: str = "prompt-mean"
    """Loss reduction: prompt-mean (the paper's 1/|D_i|), token-mean, seq-mean-token-mean,
    seq-mean-token-sum."""
    clip_low: float = 0.2
    """PPO clip range below 1 (RAFT++ and GRPO)."""
    clip_high: float = 0.2
    """PPO clip range above 1 (clip-higher: larger, e.g. 0.28-0.3)."""
    dual_clip: float | None = 3.0
    """Dual-clip constant for negative advantages (None: off)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the initial policy (0: no reference model kept)."""
    kl_kind: str = "k3"
    """KL estimator: k1, k2, k3 (low-variance, clamped)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight."""
    grpo_scale_by_std: bool = True
    """GRPO: divide centred rewards by the group std (False: Dr. GRPO style)."""
    old_logprobs: str = "recompute"
    """pi_old of the PPO ratio: recompute (a no-grad pass of the training model before the update,
    as TRL and verl do) or rollout (the sampler's log-probs; vLLM's kernels differ slightly)."""
    tis_cap: float | None = None
    """Truncated importance sampling for the sampler mismatch: weight each token's loss by
    min(pi_old / pi_rollout, tis_cap) (Yao et al. 2025; e.g. 2; None: off; needs recompute)."""


@dataclass
class UpdateConfig:
    """How the M-step walks over an iteration's samples."""

    epochs: int = 1
    """Passes over the iteration's training samples."""
    minibatch_by: str = "prompts"
    """prompts: a fixed number of optimizer steps per iteration (mini-batches of prompts, each with
    all its samples); samples: mini-batches of a fixed number of samples (step count varies)."""
    minibatch_size: int = 64
    """Prompts (or samples) per optimizer step."""
    micro_batch_size: int = 128
    """Sequences per forward/backward (gradient accumulation; memory and CPU speed)."""
    max_tokens_per_micro_batch: int | None = None
    """Micro-batch by a token budget instead (rows x own longest row <= budget, long rows
    together), for the update, the pi_old/reference passes and the gradient norms (None: by
    micro_batch_size). Bounds activation memory whatever the response lengths."""


@dataclass
class EvalConfig:
    """Held-out evaluation during training."""

    every: int = 5
    """Evaluate every k iterations (and before the first and after the last); 0: never."""
    samples: int = 4
    """Samples per held-out prompt."""
    temperature: float = 1.0
    """Sampling temperature for evaluation."""


@dataclass
class LoggingConfig:
    """Where metrics go besides DIR/metrics.jsonl."""

    tensorboard: bool = True
    """Write TensorBoard events under DIR/tensorboard."""
    wandb_project: str | None = None
    """Weights & Biases project (None: off)."""
    wandb_run_name: str | None = None
    """Weights & Biases run name."""
    progress: bool | None = None
    """Progress bars: None auto (bars on a terminal, plain lines otherwise)."""


@dataclass
class DistributedConfig:
    """Multi-process runs launched by torchrun (docs/DISTRIBUTED.md); unused by a plain run."""

    timeout_s: float = 1800.0
    """Longest wait of one rank for another at a collective before the job fails; must exceed the
    slowest rank's rollouts (a killed rank ends the job at once, whatever this is)."""


@dataclass
class TrainConfig:
    """One GVM-EM training run (arXiv 2505.02391, Algorithm 1)."""

    algorithm: str = "raft++"
    """M-step algorithm: raft, raft++ or grpo."""
    allocation: str = "uniform"
    """Sample allocation: uniform (n per prompt), gvm, gvm-history, knapsack, dapo, reinforce-ada
    or greso (README: Allocation rules); each reads its options from its own section."""
    iterations: int = 20
    """EM iterations (each: a batch of prompts, sample, update)."""
    seed: int = 0
    """Seeds data order, sampling and initialisation."""
    model: str = "builtin"
    """Policy: a local HF checkpoint directory, a hub id, or builtin (the tiny built-in model)."""
    train_data: str = "builtin"
    """Training prompts: a file/dataset path, a shipped evaluation set (math500, amc23, aime24,
    minerva_math, olympiadbench), or builtin[:split] / builtin-hard[:split]."""
    eval_data: str | None = "builtin"
    """Held-out prompts, as train_data (None: no evaluation); builtin is the built-in test split."""
    prompts_per_iteration: int = 64
    """Prompts per iteration (the paper: 1024)."""
    samples_per_prompt: int = 8
    """n for uniform allocation."""
    device: str = "auto"
    """cpu, cuda, or auto."""
    dtype: str = "auto"
    """Parameter (master weight) and optimizer-state dtype: float32, bfloat16, float16, or auto
    (float32). bf16 parameters barely move at lr 1e-6 (gvmrl.precision)."""
    compute_dtype: str = "auto"
    """Dtype of forward/backward matmuls (autocast): float32, bfloat16, float16, or auto (bfloat16
    on GPU with float32 parameters, else the parameter dtype); also vLLM's weight dtype."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass instead of keeping its activations
    (about 17x less activation memory on Qwen2.5-1.5B, one more forward pass; gvmrl.memory)."""
    threads: int | None = None
    """torch CPU threads (None: torch's default)."""
    reward: str = "answer"
    """Training reward: answer (final-answer correctness, the paper's) or answer+arithmetic (also
    every stated equation true; for the built-in task, where lucky final answers are common)."""
    verifier_workers: int = 0
    """Processes for math-verify (0: in the training process; the built-in task's integer answers
    take a fast path; use >= 1 for real models, so a grading timeout cannot disturb training)."""
    verifier_timeout: float = 5.0
    """Seconds before a grading counts as wrong."""
    save_final: bool = True
    """Write DIR/final as a plain HF checkpoint at the end."""
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    gvm: GVMConfig = field(default_factory=GVMConfig)
    gvm_history: GVMHistoryConfig = field(default_factory=GVMHistoryConfig)
    knapsack: KnapsackConfig = field(default_factory=KnapsackConfig)
    dapo: DAPOConfig = field(default_factory=DAPOConfig)
    reinforce_ada: ReinforceAdaConfig = field(default_factory=ReinforceAdaConfig)
    greso: GRESOConfig = field(default_factory=GRESOConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    update: UpdateConfig = field(default_factory=UpdateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def validate(self, check_environment: bool = True) -> TrainConfig:
        """Reject settings that cannot work, naming the key and the fix. `check_environment`:
        also check what must be installed (the vllm extra and its option names)."""
        from gvmrl.algorithms import ALGORITHMS
        from gvmrl.allocators import ALLOCATORS
        from gvmrl.losses import AGGREGATION_MODES, KL_ESTIMATORS
        from gvmrl.rewards import REWARDS
        from gvmrl.schedule import SCHEDULES

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {message}")

        check(
            self.algorithm in ALGORITHMS,
            "algorithm",
            f"must be one of {tuple(ALGORITHMS)}, got {self.algorithm!r}",
        )
        check(
            self.allocation in ALLOCATORS,
            "allocation",
            f"must be one of {tuple(ALLOCATORS)}, got {self.allocation!r}",
        )
        check(self.iterations >= 0, "iterations", "must be >= 0")
        check(self.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1")
        check(self.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
        check(self.reward in REWARDS, "reward", f"one of {tuple(REWARDS)}")
        check(self.verifier_workers >= 0, "verifier_workers", "must be >= 0")
        check(self.verifier_timeout > 0, "verifier_timeout", "must be > 0")
        check(
            re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
            "device",
            "cpu, cuda[:N] or auto",
        )
        check(
            self.dtype in ("auto", "float32", "bfloat16", "float16"),
            "dtype",
            "float32, bfloat16, float16 or auto",
        )
        check(self.rollout.engine in ("hf", "vllm"), "rollout.engine", "hf or vllm")
        check(self.rollout.temperature > 0, "rollout.temperature", "must be > 0")
        check(0 < self.rollout.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
        check(self.rollout.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        g = self.gvm
        check(g.presamples >= 1, "gvm.presamples", "must be >= 1")
        check(
            g.grad_params in ("embed_tokens", "lm_head"),
            "gvm.grad_params",
            "embed_tokens or lm_head",
        )
        check(min(g.accept_prior) >= 0, "gvm.accept_prior", "Beta prior parameters must be >= 0")
        check(0 <= g.uniform_share < 1, "gvm.uniform_share", "must be in [0, 1)")
        check(
            g.grad_norm_samples is None or g.grad_norm_samples >= 1,
            "gvm.grad_norm_samples",
            "must be >= 1 (or null: all accepted pre-samples)",
        )
        check(
            not (g.budget_inclusive and g.reuse_presamples),
            "gvm.reuse_presamples",
            "budget_inclusive already trains on the pre-samples; set only one of them",
        )
        if self.allocation in ("gvm", "gvm-history"):
            presampled = g.presamples * self.prompts_per_iteration
            check(g.budget is None or g.budget >= 0, "gvm.budget", "must be >= 0")
            check(
                not g.budget_inclusive or self.gvm_budget >= presampled,
                "gvm.budget",
                f"with budget_inclusive the budget must cover the {presampled} pre-samples",
            )
        check(self.optim.schedule in SCHEDULES, "optim.schedule", f"one of {SCHEDULES}")
        check(self.optim.lr > 0, "optim.lr", "must be > 0")
        check(
            self.loss.aggregation in AGGREGATION_MODES,
            "loss.aggregation",
            f"one of {AGGREGATION_MODES}",
        )
        check(self.loss.kl_kind in KL_ESTIMATORS, "loss.kl_kind", f"one of {tuple(KL_ESTIMATORS)}")
        check(
            self.loss.dual_clip is None or self.loss.dual_clip > 1,
            "loss.dual_clip",
            "must be > 1 or null",
        )
        check(
            self.update.minibatch_by in ("prompts", "samples"),
            "update.minibatch_by",
            "prompts or samples",
        )
        check(self.update.minibatch_size >= 1, "update.minibatch_size", "must be >= 1")
        check(self.update.micro_batch_size >= 1, "update.micro_batch_size", "must be >= 1")
        check(self.update.epochs >= 1, "update.epochs", "must be >= 1")
        check(self.eval.every >= 0, "eval.every", "must be >= 0")
        check(self.eval.samples >= 1, "eval.samples", "must be >= 1")
        self._check_ranges()
        self._check_allocation_rules()
        self._check_gpu_path(check_environment)
        return self

    def _check_allocation_rules(self) -> None:
        """The sections of the further rules, each checked whatever rule is chosen (a bad
        value fails now, not when someone switches rules on a resumed config)."""
        h, k, d, r, s = self.gvm_history, self.knapsack, self.dapo, self.reinforce_ada, self.greso
        prompts, n = self.prompts_per_iteration, self.samples_per_prompt
        floors = max(n, k.min_size, k.zero_size or 0, k.one_size or 0)
        checks: list[tuple[bool, str, str]] = [
            (_finite(h.decay) and 0 <= h.decay <= 1, "gvm_history.decay", "must be in [0, 1]"),
            (
                all(_finite(v) and v >= 0 for v in h.accept_prior),
                "gvm_history.accept_prior",
                "must be finite and >= 0",
            ),
            (h.unseen in ("presample", "prior"), "gvm_history.unseen", "presample or prior"),
            (
                0 <= h.unseen_accept_rate <= 1,
                "gvm_history.unseen_accept_rate",
                "must be in [0, 1]",
            ),
            (k.min_size >= 1, "knapsack.min_size", "must be >= 1"),
            (k.max_size >= k.min_size, "knapsack.max_size", "must be >= knapsack.min_size"),
            (k.zero_size is None or k.zero_size >= 0, "knapsack.zero_size", "must be >= 0"),
            (k.one_size is None or k.one_size >= 0, "knapsack.one_size", "must be >= 0"),
            (
                floors <= n,
                "knapsack.min_size",
                f"the floors (min_size, zero_size, one_size: up to {floors}) must not exceed "
                f"samples_per_prompt ({n}), or {prompts} known prompts could exceed the budget",
            ),
            (0 < k.confidence < 1, "knapsack.confidence", "must be in (0, 1)"),
            (
                k.cost_estimate in ("probability", "expectation"),
                "knapsack.cost_estimate",
                "probability or expectation",
            ),
            (k.min_history_samples >= 1, "knapsack.min_history_samples", "must be >= 1"),
            (_finite(k.decay) and 0 <= k.decay <= 1, "knapsack.decay", "must be in [0, 1]"),
            (
                d.gen_prompts is None or d.gen_prompts >= prompts,
                "dapo.gen_prompts",
                f"must be >= prompts_per_iteration ({prompts}), or null (3 x that)",
            ),
            (d.max_rounds >= 1, "dapo.max_rounds", "must be >= 1"),
            (_finite(d.headroom) and d.headroom >= 1, "dapo.headroom", "must be >= 1"),
            (d.min_round_prompts >= 1, "dapo.min_round_prompts", "must be >= 1"),
            (
                r.exit_rule in ("balanced", "positive_focused"),
                "reinforce_ada.exit_rule",
                "balanced or positive_focused",
            ),
            (r.round_samples >= 1, "reinforce_ada.round_samples", "must be >= 1"),
            (r.max_rounds >= 1, "reinforce_ada.max_rounds", "must be >= 1"),
            (
                r.group_size is None or r.group_size >= 1,
                "reinforce_ada.group_size",
                "must be >= 1 (or null: samples_per_prompt)",
            ),
            (
                _finite(r.positive_threshold),
                "reinforce_ada.positive_threshold",
                "must be finite",
            ),
            (
                r.budget is None or r.budget >= 1,
                "reinforce_ada.budget",
                "must be >= 1 (or null: no cap beyond the rounds)",
            ),
            (0 < s.initial_base <= 1, "greso.initial_base", "must be in (0, 1]"),
            (0 <= s.target_zero_variance <= 1, "greso.target_zero_variance", "must be in [0, 1]"),
            (_finite(s.step) and s.step >= 0, "greso.step", "must be >= 0"),
            (
                0 < s.base_range[0] <= s.initial_base <= s.base_range[1] <= 1,
                "greso.base_range",
                "must satisfy 0 < low <= greso.initial_base <= high <= 1",
            ),
            (0 <= s.min_keep <= 1, "greso.min_keep", "must be in [0, 1]"),
            (
                s.adapt_after_prompts is None or s.adapt_after_prompts >= 0,
                "greso.adapt_after_prompts",
                "must be >= 0 (or null: one epoch)",
            ),
        ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")

    def _check_gpu_path(self, check_environment: bool) -> None:
        """Precision, micro-batching, pi_old and vLLM options: all before any weights load."""
        from gvmrl.precision import resolve_precision

        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: {message}")

        try:
            resolve_precision(self.dtype, self.compute_dtype, "cuda")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        budget = self.update.max_tokens_per_micro_batch
        check(budget is None or budget >= 1, "update.max_tokens_per_micro_batch", "must be >= 1")
        loss = self.loss
        check(
            loss.old_logprobs in ("recompute", "rollout"),
            "loss.old_logprobs",
            "recompute or rollout",
        )
        check(
            loss.tis_cap is None or (_finite(loss.tis_cap) and loss.tis_cap > 0),
            "loss.tis_cap",
            "must be finite and > 0 (or null: off)",
        )
        check(
            loss.tis_cap is None or loss.old_logprobs == "recompute",
            "loss.tis_cap",
            "compares the recomputed pi_old with the rollout log-probs; set "
            "loss.old_logprobs: recompute (with rollout the weight would always be 1)",
        )
        check(
            self.rollout.engine != "vllm" or re.fullmatch(r"cuda:0*[1-9]\d*", self.device) is None,
            "device",
            f"{self.device} with rollout.engine vllm, which runs on the first visible GPU: "
            "choose the GPU with CUDA_VISIBLE_DEVICES and set device=cuda",
        )
        v = self.rollout.vllm
        check(v.max_num_seqs >= 1, "rollout.vllm.max_num_seqs", "must be >= 1")
        check(v.sleep_level in (1, 2), "rollout.vllm.sleep_level", "1 or 2")
        check(
            v.max_model_len is None or v.max_model_len > self.rollout.max_new_tokens,
            "rollout.vllm.max_model_len",
            f"must exceed rollout.max_new_tokens ({self.rollout.max_new_tokens}) to fit a prompt",
        )
        check(isinstance(v.options, dict), "rollout.vllm.options", "must be a mapping")
        if self.rollout.engine == "vllm" and check_environment:
            from gvmrl.rollout.vllm import check_llm_options, check_vllm_device

            try:
                check_llm_options(v.options)
                check_vllm_device()
            except (ImportError, ValueError, RuntimeError) as e:
                raise ConfigError(str(e)) from None

    def _check_ranges(self) -> None:
        """Every number in range and finite, so no value fails mid-run after the model loaded."""
        g, o, loss = self.gvm, self.optim, self.loss
        checks: list[tuple[bool, str, str]] = [
            (0 <= self.seed < 2**63, "seed", "must be in [0, 2^63)"),
            (bool(self.model), "model", "must not be empty"),
            (bool(self.train_data), "train_data", "must not be empty"),
            (self.eval_data != "", "eval_data", "must not be empty (null: no evaluation)"),
            (self.threads is None or self.threads >= 1, "threads", "must be >= 1 (or null)"),
            (_finite(self.verifier_timeout), "verifier_timeout", "must be finite"),
            (
                _finite(self.distributed.timeout_s) and self.distributed.timeout_s > 0,
                "distributed.timeout_s",
                "must be finite and > 0",
            ),
            (self.data.overlong in ("skip", "error"), "data.overlong", "skip or error"),
            (
                self.data.eval_limit is None or self.data.eval_limit >= 1,
                "data.eval_limit",
                "must be >= 1 (or null: all)",
            ),
            (bool(self.data.problem_field), "data.problem_field", "must not be empty"),
            (bool(self.data.answer_field), "data.answer_field", "must not be empty"),
            (_finite(self.rollout.temperature), "rollout.temperature", "must be finite"),
            (self.rollout.batch_size >= 1, "rollout.batch_size", "must be >= 1"),
            (
                0 < self.rollout.gpu_memory_utilization <= 1,
                "rollout.gpu_memory_utilization",
                "must be in (0, 1]",
            ),
            (g.budget is None or g.budget >= 0, "gvm.budget", "must be >= 0 (or null)"),
            (_finite(g.alpha) and g.alpha >= 0, "gvm.alpha", "must be finite and >= 0"),
            (_finite(g.beta), "gvm.beta", "must be finite"),
            (g.min_size >= 0, "gvm.min_size", "must be >= 0"),
            (
                g.max_size is None or g.max_size >= max(g.min_size, 1),
                "gvm.max_size",
                f"must be >= max(gvm.min_size, 1) = {max(g.min_size, 1)} (or null)",
            ),
            (
                g.drop_above is None or 0 < g.drop_above <= 1,
                "gvm.drop_above",
                "must be in (0, 1] (or null)",
            ),
            (
                g.min_expected_accepts is None
                or (_finite(g.min_expected_accepts) and g.min_expected_accepts >= 0),
                "gvm.min_expected_accepts",
                "must be finite and >= 0 (or null)",
            ),
            (all(map(_finite, g.accept_prior)), "gvm.accept_prior", "must be finite"),
            (g.grad_batch_size >= 1, "gvm.grad_batch_size", "must be >= 1"),
            (_finite(o.lr), "optim.lr", "must be finite"),
            (_finite(o.weight_decay) and o.weight_decay >= 0, "optim.weight_decay", "must be >= 0"),
            (all(0 <= b < 1 for b in o.betas), "optim.betas", "each must be in [0, 1)"),
            (o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0"),
            (_finite(o.grad_clip) and o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: off)"),
            (o.max_skipped_steps >= 1, "optim.max_skipped_steps", "must be >= 1"),
            (0 <= loss.clip_low < 1, "loss.clip_low", "must be in [0, 1)"),
            (_finite(loss.clip_high) and loss.clip_high >= 0, "loss.clip_high", "must be >= 0"),
            (
                loss.dual_clip is None or _finite(loss.dual_clip),
                "loss.dual_clip",
                "must be finite (or null)",
            ),
            (_finite(loss.kl_coef) and loss.kl_coef >= 0, "loss.kl_coef", "must be >= 0"),
            (_finite(loss.entropy_coef), "loss.entropy_coef", "must be finite"),
            (
                _finite(self.eval.temperature) and self.eval.temperature >= 0,
                "eval.temperature",
                "must be >= 0 (0: greedy)",
            ),
        ]
        if self.allocation in ("gvm", "gvm-history"):
            # What the allocator splits each iteration; it must fit the floors and caps.
            budget = self.gvm_budget - (
                g.presamples * self.prompts_per_iteration if g.budget_inclusive else 0
            )
            prompts = self.prompts_per_iteration
            checks += [
                (
                    g.min_size * prompts <= budget,
                    "gvm.min_size",
                    f"{prompts} prompts x {g.min_size} exceed the budget of {budget} samples",
                ),
                (
                    g.max_size is None or g.max_size * prompts >= budget,
                    "gvm.max_size",
                    f"{prompts} prompts x {g.max_size} cannot hold the budget of {budget} samples",
                ),
            ]
        for ok, key, message in checks:
            if not ok:
                raise ConfigError(f"{key}: {message}")

    @property
    def gvm_budget(self) -> int:
        """N, the samples per iteration under GVM (pre-samples included when budget-inclusive)."""
        if self.gvm.budget is not None:
            return self.gvm.budget
        per_prompt = self.samples_per_prompt if self.gvm.budget_inclusive else self.gvm.presamples
        return per_prompt * self.prompts_per_iteration

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A config key with a bad name, type or value; the message starts with the dotted key."""


def _finite(value: float) -> bool:
    return math.isfinite(value)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    check_environment: bool = True,
) -> TrainConfig:
    """Defaults, then the YAML file (if any), then `key=value` overrides (dotted keys, YAML values).

    `check_environment=False` skips what depends on installed packages (`gvmrl plan` estimates a
    vLLM run's memory on a machine without vLLM)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            text = read_text(path)
        except InputError as e:
            raise ConfigError(str(e)) from None
        loaded = _parse_yaml(text, str(path)) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        values = loaded
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not _KEY.fullmatch(key.strip()):
            raise ConfigError(
                f"{override!r}: overrides take the form key=value (e.g. gvm.presamples=4)"
            )
        value = _parse_yaml(raw, key.strip(), lines=False) if raw.strip() else None
        _set_dotted(values, key.strip(), value)
    return _build(TrainConfig, values, prefix="").validate(check_environment)


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def _parse_yaml(text: str, where: str, *, lines: bool = True) -> Any:
    """`yaml.safe_load`, its failures a one-line ConfigError at `where` (a file and the line, or
    a --set key)."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        line = f":{mark.line + 1}" if lines and mark is not None else ""
        raise ConfigError(f"{where}{line}: invalid YAML: {e.problem or e.context}") from None
    except (yaml.YAMLError, RecursionError, ValueError) as e:
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None


def add_override_argument(parser: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`, for every command that builds a
    config."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def save_config(config: TrainConfig, path: str | Path) -> None:
    write_text(path, yaml.safe_dump(_yaml_ready(config.to_dict()), sort_keys=False))


def _yaml_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _yaml_ready(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_yaml_ready(v) for v in value]
    return value


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[leaf] = value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(
                f"{prefix}{key}: unknown key; known keys here: {', '.join(sorted(known))}"
            )
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{prefix}{name}: is a section; set its keys, e.g. {prefix}{name}.KEY=VALUE"
                )
            kwargs[name] = _build(hint, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a field type, allowing int -> float, "1e-5" -> float, list -> tuple."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}"
        )
    if origin is tuple:
        item_types = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise ConfigError(f"{key}: expected a list of {len(item_types)} values, got {value!r}")
        return tuple(
            _coerce(v, t, f"{key}[{i}]") for i, (v, t) in enumerate(zip(value, item_types))
        )
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint in (float, str) and not isinstance(value, hint):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value
