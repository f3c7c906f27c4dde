"""How much of the M-step's gradient noise can an allocation remove, and does GVM remove it?

From a checkpoint (the built-in one by default), draw a pool of K responses to each of B prompts,
take the exact gradient of every accepted response w.r.t. GVM's parameter group (the token
embeddings), and measure per prompt the accept rate p_i and the mean mu_i and spread s_i^2 of
the gradient the RAFT++ update averages (the response's summed log-prob divided by its length:
prompt-mean aggregation). `gradient_error.py` then gives the expected squared error of the batch's
update direction under any allocation, exactly, for:

  uniform-n, uniform-2n        n = 8 and 16 samples per prompt
  gvm (true p, G)              the paper's rule with the pool's p_i and G_i
  gvm (true p, G/len)          the same with G_i of the length-normalised gradient the update uses
  gvm / gvm-reuse              N' = 8 pre-samples drawn from the pool (R redraws), budget 8B;
                               gvm-reuse's pre-samples are modelled as independent of n_i
  gvm-incl-2, gvm-incl-4       budget-inclusive: N' = 2 or 4 pre-samples, trained on
  ... share L                  the estimated arms with gvm.uniform_share = L (a defensive mixture)
  gvm, G_i from <= 2 accepted  gvm with G_i averaged over at most 2 accepted pre-samples
  best                         the allocation minimising this error (greedy): the ceiling

Each error is also read as the uniform n with the same error ("worth n uniform samples per
prompt", next to what the arm generates per prompt), and set beside the noise of drawing the
batch of B prompts itself, which no allocation reduces.

    python bench/variance.py                                   # built-in task, B = 64, K = 64
    python bench/variance.py --tasks builtin builtin-hard --model DIR

Writes OUT/results.json. Tiny models only: it keeps every accepted gradient vector in memory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gvmrl.allocation import allocate
from gvmrl.batching import pack_sequences, token_logprobs
from gvmrl.config import BUILTIN_RECIPE, load_config
from gvmrl.estimation import sequence_grad_norms
from gvmrl.io import json_ready, write_json
from gvmrl.progress import format_table
from gvmrl.records import is_accepted
from gvmrl.run_setup import PHASE_SAMPLE
from gvmrl.train import Trainer

from common import QUIET, TASKS
from gradient_error import accepted_mean_error, best_sizes

# arm -> (pre-samples N', main budget per prompt, pre-samples trained on, Beta prior of p_i)
ESTIMATED_ARMS = {
    "gvm": (8, 8, False, (0.0, 0.0)),
    "gvm-reuse": (8, 8, True, (0.0, 0.0)),
    "gvm-incl-2": (2, 6, True, (0.5, 0.5)),
    "gvm-incl-4": (4, 4, True, (0.5, 0.5)),
}


def accepted_gradients(trainer: Trainer, samples) -> tuple[np.ndarray, np.ndarray]:
    """(A, D) gradients of each sample's summed response log-prob w.r.t. the input embedding
    matrix, one backward pass per sample (independent of gvmrl.estimation's batched method),
    and (A,) response lengths."""
    model, weight = trainer.model, trainer.model.get_input_embeddings().weight
    model.eval()
    vectors = []
    for s in samples:
        batch = pack_sequences([s.prompt_ids], [s.response_ids], trainer.tokenizer.pad_token_id)
        batch = batch.to(trainer.device)
        total = (token_logprobs(model, batch) * batch.response_mask).sum()
        vectors.append(torch.autograd.grad(total, weight)[0].flatten().double().cpu().numpy())
    lengths = np.array([len(s.response_ids) for s in samples], dtype=np.float64)
    return np.stack(vectors), lengths


def prompt_moments(group, accepted, vectors, lengths, num_prompts):
    """Per prompt: accept rate, mean and spread of the length-normalised gradient, ||mean||^2,
    and the mean gradient norms G (summed log-prob, as the paper) and G/len."""
    pool = np.bincount(group, minlength=num_prompts)
    acc_group = group[accepted]
    normalised = vectors / lengths[:, None]
    m = {
        "accept_rate": np.bincount(acc_group, minlength=num_prompts) / pool,
        "spread": np.full(num_prompts, np.nan),
        "mean_sq": np.zeros(num_prompts),
        "grad_norm": np.zeros(num_prompts),
        "grad_norm_per_token": np.zeros(num_prompts),
        "length": np.full(num_prompts, np.nan),
    }
    means = np.zeros((num_prompts, vectors.shape[1]))
    for i in range(num_prompts):
        rows = np.flatnonzero(acc_group == i)
        if rows.size == 0:
            continue
        mean = normalised[rows].mean(axis=0)
        means[i] = mean
        m["mean_sq"][i] = mean @ mean
        if rows.size > 1:  # unbiased spread of the accepted responses' gradients
            m["spread"][i] = ((normalised[rows] - mean) ** 2).sum() / (rows.size - 1)
        m["grad_norm"][i] = np.linalg.norm(vectors[rows], axis=1).mean()
        m["grad_norm_per_token"][i] = np.linalg.norm(normalised[rows], axis=1).mean()
        m["length"][i] = lengths[rows].mean()
    # one accepted response in the pool shows no spread: take the median of the others
    missing = np.isnan(m["spread"]) & (m["accept_rate"] > 0)
    m["spread"][missing] = np.nanmedian(m["spread"])
    m["spread"] = np.nan_to_num(m["spread"])
    return m, means


def estimated_sizes(
    rng, group, scores, norms, num_prompts, presamples, budget, prior, share, grad_samples=None
):
    """Draw N' pre-samples per prompt from the pool, estimate p_i and G_i (from at most
    `grad_samples` accepted ones: gvm.grad_norm_samples), allocate the budget (a `share` of it
    spread evenly: gvm.uniform_share)."""
    p_hat, g_hat = np.zeros(num_prompts), np.zeros(num_prompts)
    for i in range(num_prompts):
        drawn = rng.choice(np.flatnonzero(group == i), size=presamples)
        ok = is_accepted(scores[drawn])
        p_hat[i] = (ok.sum() + prior[0]) / (presamples + sum(prior))
        g_hat[i] = norms[drawn[ok][:grad_samples]].mean() if ok.any() else 0.0
    if not ((p_hat > 0) & (g_hat > 0)).any() and share == 0:
        return np.zeros(num_prompts, dtype=np.int64), p_hat, g_hat
    return allocate(p_hat, g_hat, budget, rule="gvm", uniform_share=share), p_hat, g_hat


def _corr(a, b) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def analyse(args, task: str) -> dict:
    out = Path(args.output_dir)
    config = load_config(
        None,
        [
            "algorithm=raft++",
            f"model={args.model}",
            f"train_data={TASKS[task][0]}",
            "eval_data=null",
            f"prompts_per_iteration={args.prompts}",
            f"seed={args.seed}",
            *BUILTIN_RECIPE,
            *QUIET,
        ],
    )
    trainer = Trainer(config, out / "runs" / task)
    started = time.perf_counter()
    prompts = trainer.stream.batch(1)
    pool = trainer.sample(prompts, [args.pool] * len(prompts), 1, PHASE_SAMPLE)
    accepted = np.flatnonzero(pool.accepted)
    samples = [pool.samples[j] for j in accepted]
    vectors, lengths = accepted_gradients(trainer, samples)
    print(f"{task}: pool and gradients in {time.perf_counter() - started:.0f}s", file=sys.stderr)

    # cross-check: the batched exact norms GVM uses against these one-by-one gradients
    check = samples[:64]
    batched = sequence_grad_norms(
        trainer.model,
        [s.prompt_ids for s in check],
        [s.response_ids for s in check],
        trainer.tokenizer.pad_token_id,
    ).numpy()
    naive = np.linalg.norm(vectors[: len(check)], axis=1)
    norm_check = float(np.max(np.abs(batched - naive) / naive))
    if norm_check > 1e-3:
        raise RuntimeError(f"batched and one-by-one gradient norms differ by {norm_check:.2e}")

    B, budget = len(prompts), args.budget * len(prompts)
    m, means = prompt_moments(pool.group, accepted, vectors, lengths, B)
    largest = budget + max(n for n, *_ in ESTIMATED_ARMS.values())
    table = accepted_mean_error(
        np.arange(largest + 1)[None, :],
        m["accept_rate"][:, None],
        m["spread"][:, None],
        m["mean_sq"][:, None],
    )  # (B, largest + 1)
    rows_index = np.arange(B)

    def error(sizes) -> float:
        return float(table[rows_index, sizes].sum() / B**2)

    signal = float(np.sum(means.mean(axis=0) ** 2))
    live = m["accept_rate"] > 0
    prompt_noise = float(((means[live] - means[live].mean(axis=0)) ** 2).sum() / (live.sum() - 1))
    prompt_noise /= B  # the variance of a mean over B prompts drawn from this population
    uniform_n = np.arange(1, min(16 * args.budget, largest) + 1)
    uniform_error = np.array([error(np.full(B, n)) for n in uniform_n])

    def worth(err: float) -> float:
        """The uniform samples per prompt with the same error (interpolated on a log scale)."""
        if err <= uniform_error[-1]:
            return float(uniform_n[-1])
        return float(np.interp(-np.log(err), -np.log(uniform_error), uniform_n))

    rows = []

    def add(arm, sizes_list, presamples, trained_presamples):
        errs = [
            error(np.minimum(s + (presamples if trained_presamples else 0), largest))
            for s in sizes_list
        ]
        sizes = np.stack(sizes_list)
        err = float(np.mean(errs))
        rows.append(
            {
                "arm": arm,
                "generated_per_prompt": float(sizes.sum(axis=1).mean() / B + presamples),
                "error": err,
                "error_over_signal": err / signal,
                "error_over_prompt_noise": err / prompt_noise,
                "worth_uniform_n": worth(err),
                "zero_share": float((sizes == 0).mean()),
                "max_share": float((sizes.max(axis=1) / np.maximum(sizes.sum(axis=1), 1)).mean()),
            }
        )

    n = args.budget
    add("uniform-n", [np.full(B, n)], 0, False)
    add("uniform-2n", [np.full(B, 2 * n)], 0, False)
    add("gvm (true p, G)", [allocate(m["accept_rate"], m["grad_norm"], budget)], n, False)
    add(
        "gvm (true p, G/len)",
        [allocate(m["accept_rate"], m["grad_norm_per_token"], budget)],
        n,
        False,
    )
    add("best (true curves)", [best_sizes(table, budget)], n, False)
    rng = np.random.default_rng(args.seed)
    norms = np.zeros(len(pool.scores))
    norms[accepted] = np.linalg.norm(vectors, axis=1)
    estimates = {}
    for arm, (presamples, main, trained, prior) in ESTIMATED_ARMS.items():
        for share in args.uniform_shares:
            draws = [
                estimated_sizes(
                    rng, pool.group, pool.scores, norms, B, presamples, main * B, prior, share
                )
                for _ in range(args.redraws)
            ]
            add(
                arm + (f" share {share:g}" if share else ""),
                [d[0] for d in draws],
                presamples,
                trained,
            )
            if arm == "gvm" and share == 0:
                estimates = {
                    "corr_p_hat_p": float(np.mean([_corr(d[1], m["accept_rate"]) for d in draws])),
                    "corr_G_hat_G": float(
                        np.mean(
                            [_corr(np.where(d[2] > 0, d[2], np.nan), m["grad_norm"]) for d in draws]
                        )
                    ),
                    "missed_share": float(
                        np.mean([((d[1] == 0) & live).sum() / live.sum() for d in draws])
                    ),
                }
    capped = [
        estimated_sizes(
            rng, pool.group, pool.scores, norms, B, n, budget, (0, 0), 0, grad_samples=2
        )
        for _ in range(args.redraws)
    ]
    add("gvm, G_i from <= 2 accepted", [d[0] for d in capped], n, False)
    estimates["corr_G_hat_G_from_2"] = float(
        np.mean([_corr(np.where(d[2] > 0, d[2], np.nan), m["grad_norm"]) for d in capped])
    )
    stats = {
        "prompts": B,
        "pool_per_prompt": args.pool,
        "accepted": int(accepted.size),
        "accept_rate_mean": float(m["accept_rate"].mean()),
        "solved_share": float(live.mean()),
        "always_share": float((m["accept_rate"] == 1).mean()),
        "corr_p_G": _corr(m["accept_rate"], np.where(live, m["grad_norm"], np.nan)),
        "corr_p_G_per_token": _corr(
            m["accept_rate"], np.where(live, m["grad_norm_per_token"], np.nan)
        ),
        "corr_p_length": _corr(m["accept_rate"], m["length"]),
        "corr_G_length": _corr(np.where(live, m["grad_norm"], np.nan), m["length"]),
        "signal": signal,
        "prompt_noise": prompt_noise,
        "uniform_n_error": float(uniform_error[n - 1]),
        "norm_check_max_rel_diff": norm_check,
        **{f"n8_{k}": v for k, v in estimates.items()},
    }
    columns = list(rows[0])
    print(f"\n{task}: " + ", ".join(f"{k} {v:.3g}" for k, v in stats.items()))
    print(format_table(rows, columns))
    return {"task": task, "stats": stats, "arms": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["builtin"], choices=list(TASKS))
    parser.add_argument("--model", default="builtin")
    parser.add_argument("--prompts", type=int, default=64, help="B, prompts in the batch")
    parser.add_argument("--pool", type=int, default=64, help="K, responses drawn per prompt")
    parser.add_argument("--budget", type=int, default=8, help="n, samples per prompt of uniform-n")
    parser.add_argument("--redraws", type=int, default=200, help="R, pre-sample redraws")
    parser.add_argument(
        "--uniform-shares",
        type=float,
        nargs="+",
        default=[0.0, 0.25, 0.5],
        help="gvm.uniform_share values tried with estimated statistics",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="bench/results/variance")
    args = parser.parse_args()
    results = {
        "command": "python bench/variance.py " + " ".join(sys.argv[1:]),
        "settings": vars(args),
        "tasks": [analyse(args, task) for task in args.tasks],
    }
    write_json(Path(args.output_dir) / "results.json", json_ready(results))
    print(f"wrote {Path(args.output_dir) / 'results.json'}")


if __name__ == "__main__":
    main()
