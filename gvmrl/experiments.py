"""Named experiment arms and the settings of a comparison on the built-in task, defined once for
`gvmrl demo` and the benchmarks (bench/common.py).

An arm is a list of config overrides that sets one allocation setting; applied on top of
`builtin_run_overrides`, runs of different arms differ only in it (same checkpoint, seed, prompt
stream and update settings).
"""

from __future__ import annotations

from gvmrl.config import BUILTIN_RECIPE

ARMS: dict[str, list[str]] = {
    # n samples per prompt (samples_per_prompt, 8 unless set)
    "uniform": ["allocation=uniform"],
    # 2n = 16: generates as much per iteration as GVM with its N' = 8 pre-samples
    "uniform-2n": ["allocation=uniform", "samples_per_prompt=16"],
    # the paper: N' = 8 pre-samples (not trained on), then the budget allocated
    "gvm": ["allocation=gvm", "gvm.presamples=8"],
    # as gvm, and the pre-samples are trained on too
    "gvm-reuse": ["allocation=gvm", "gvm.presamples=8", "gvm.reuse_presamples=true"],
    # budget-inclusive: N' pre-samples (trained on) count toward the budget
    "gvm-inclusive": ["allocation=gvm", "gvm.presamples=4", "gvm.budget_inclusive=true"],
    # budget-inclusive with a Beta(0.5, 0.5) prior on p_i, which few pre-samples need
    "gvm-incl-2": [
        "allocation=gvm",
        "gvm.presamples=2",
        "gvm.budget_inclusive=true",
        "gvm.accept_prior=[0.5,0.5]",
    ],
    "gvm-incl-4": [
        "allocation=gvm",
        "gvm.presamples=4",
        "gvm.budget_inclusive=true",
        "gvm.accept_prior=[0.5,0.5]",
    ],
    # the further rules (README: Allocation rules), each with its section's defaults
    # GVM on p_i, G_i from earlier visits; N' = 8 pre-samples only for unseen prompts
    "gvm-history": ["allocation=gvm-history", "gvm.presamples=8"],
    # Knapsack-RL: n x prompts spread by each prompt's value at its last visit's success rate
    "knapsack": ["allocation=knapsack"],
    # DAPO dynamic sampling: rounds of 3 x prompts, all-equal groups dropped
    "dapo": ["allocation=dapo"],
    # Reinforce-Ada: rounds of 8 per active prompt until a right and a wrong answer, balanced n
    "reinforce-ada": ["allocation=reinforce-ada"],
    # GRESO: prompts with all-equal streaks skipped before DAPO's rounds
    "greso": ["allocation=greso"],
}

# `gvmrl demo` compares these with the first, on the same seeds; an allocation rule that the
# benchmarks find paying joins here as another arm.
DEMO_ARMS = ("uniform", "gvm")


def builtin_run_overrides(
    *,
    algorithm: str,
    seed: int,
    iterations: int,
    prompts: int,
    train_data: str = "builtin",
    eval_data: str = "builtin",
    eval_every: int = 4,
    eval_samples: int = 4,
    eval_prompts: int = 128,
) -> list[str]:
    """A run on the built-in task from the built-in checkpoint with `BUILTIN_RECIPE`'s update
    settings and four mini-batches of prompts per iteration."""
    return [
        f"algorithm={algorithm}",
        f"seed={seed}",
        "model=builtin",
        f"train_data={train_data}",
        f"eval_data={eval_data}",
        f"iterations={iterations}",
        f"prompts_per_iteration={prompts}",
        *BUILTIN_RECIPE,
        f"update.minibatch_size={max(1, prompts // 4)}",
        f"eval.every={eval_every}",
        f"eval.samples={eval_samples}",
        f"data.eval_limit={eval_prompts}",
    ]
