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
}

DEMO_ARMS = ("uniform", "gvm", "gvm-inclusive")


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
