"""The GVM-EM loop end to end on the built-in model: outputs, accounting, M-step numerics,
resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_wiring import update_gradient

from gvmrl.allocators import measured_subset
from gvmrl.cli import main
from gvmrl.config import load_config
from gvmrl.estimation import sequence_grad_norms
from gvmrl.records import Rollouts
from gvmrl.tracking import read_metrics
from gvmrl.train import Trainer, minibatch_rows

PROMPTS = 8


def small_overrides(checkpoint, data):
    """A run small enough for tests: 8 prompts x 4 samples, short responses, one thread."""
    return [
        f"model={checkpoint}",
        f"train_data={data}",
        f"eval_data={data}",
        "data.instruction=null",
        "data.eval_limit=8",
        f"prompts_per_iteration={PROMPTS}",
        "samples_per_prompt=4",
        "gvm.presamples=4",
        "rollout.max_new_tokens=40",
        "eval.every=2",
        "eval.samples=2",
        "update.minibatch_size=4",
        "update.micro_batch_size=8",
        "optim.lr=1e-3",
        "logging.progress=false",
        "threads=1",
    ]


def small_config(checkpoint, data, *extra):
    return load_config(None, [*small_overrides(checkpoint, data), *extra])


@pytest.mark.parametrize("seed", range(5))
def test_minibatches_by_prompts_keep_prompts_whole(seed):
    group = np.array([0, 0, 1, 2, 2, 2, 3, 5, 5])  # prompt 4 has no rows
    chunks = minibatch_rows(
        group, by="prompts", size=2, num_prompts=6, rng=np.random.default_rng(seed)
    )
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(group)))
    for chunk in chunks:
        assert 1 <= len(set(group[chunk].tolist())) <= 2
    for prompt in set(group.tolist()):
        holding = [i for i, chunk in enumerate(chunks) if prompt in group[chunk]]
        assert len(holding) == 1, f"prompt {prompt} split over mini-batches {holding}"
    assert len(chunks) == 3  # six prompts in pairs; prompt 4 always shares with a live one here


def test_minibatches_by_samples_cut_a_permutation():
    group = np.array([0, 0, 1, 2, 2, 2, 3])
    chunks = minibatch_rows(
        group, by="samples", size=3, num_prompts=4, rng=np.random.default_rng(0)
    )
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert sorted(np.concatenate(chunks).tolist()) == list(range(len(group)))


@pytest.mark.parametrize(
    "override, key",
    [
        ("iteration=3", "iteration"),
        ("gvm.presample=2", "gvm.presample"),
        ("algorithm=ppo", "algorithm"),
        ("optim.lr=fast", "optim.lr"),
        ("loss.kl_kind=k9", "loss.kl_kind"),
        ("gvm.uniform_share=1", "gvm.uniform_share"),
        ("gvm.grad_norm_samples=0", "gvm.grad_norm_samples"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, capsys, override, key):
    assert main(["train", "--set", override, "--output-dir", str(tmp_path / "run")]) == 2
    assert f"gvmrl train: {key}:" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_gvm_run_outputs_and_sample_accounting(tmp_path, warm_checkpoint, easy_prompts):
    # lr 1e-4: at the small config's 1e-3 the first step can leave no pre-sample accepted
    config = small_config(
        warm_checkpoint, easy_prompts, "allocation=gvm", "iterations=2", "optim.lr=1e-4"
    )
    Trainer(config, tmp_path).run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    previous = {"samples_generated": 0, "tokens_generated": 0, "wall_time": 0.0}
    for row in rows[1:]:
        # Some pre-sample is accepted in every iteration here, so the allocated budget sums to
        # N' x prompts exactly; with pre-samples (N' per prompt) that is what the run generated.
        sizes = row["samples_per_prompt"]
        assert row["accept_rate_mean"] > 0
        assert row["presamples"] == 4 * PROMPTS
        assert sum(sizes) == 4 * PROMPTS and row["samples"] == sum(sizes)
        assert row["alloc_budget"] == sum(sizes) and row["alloc_max"] == max(sizes)
        assert row["alloc_zero_share"] == np.mean(np.array(sizes) == 0)
        generated = row["samples_generated"] - previous["samples_generated"]
        assert generated == row["presamples"] + row["samples"]
        # every response has 1..max_new_tokens (40) tokens
        assert generated <= row["tokens_generated"] - previous["tokens_generated"] <= 40 * generated
        assert row["train_accuracy"] == row["accepted_samples"] / row["samples"]  # 0/1 rewards
        phases = sum(v for k, v in row.items() if k.startswith("time_"))
        assert 0 < phases <= row["wall_time"] - previous["wall_time"]
        assert row["time_presample"] > 0 and row["time_stats"] > 0
        assert row["optimizer_steps"] == 2  # 8 prompts in mini-batches of 4
        assert row["trained_samples"] == row["accepted_samples"]  # RAFT++: the accepted main ones
        assert np.isfinite(row["loss"])
        previous = row
    assert rows[2]["eval_accuracy"] is not None and rows[0]["eval_accuracy"] is not None
    assert sum(r["presample_accuracy"] for r in rows[1:]) > 0, (
        "the warm model should solve some short chains"
    )
    saved = load_config(tmp_path / "config.yaml")
    assert saved == config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for sub in ("checkpoints/latest", "final"):
        AutoModelForCausalLM.from_pretrained(tmp_path / sub)
        AutoTokenizer.from_pretrained(tmp_path / sub)
    assert any(
        p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").rglob("*")
    )


def test_budget_inclusive_generates_what_uniform_generates(tmp_path, warm_checkpoint, easy_prompts):
    inclusive = small_config(
        warm_checkpoint,
        easy_prompts,
        "allocation=gvm",
        "gvm.presamples=2",
        "gvm.budget_inclusive=true",
        "gvm.budget=32",
        "iterations=1",
        "eval.every=0",
    )
    Trainer(inclusive, tmp_path / "inclusive").run()
    row = read_metrics(tmp_path / "inclusive" / "metrics.jsonl")[-1]
    # 2 pre-samples x 8 prompts, all trained on, plus 16 allocated: 32 = 4 x 8 as uniform draws
    assert row["accept_rate_mean"] > 0  # some prompt qualifies, so the 16 are allocated
    assert row["presamples"] == 16 and row["samples"] == 16
    assert row["samples_generated"] == 32 == 4 * PROMPTS
    # RAFT++ trains on the accepted samples of both phases
    accepted_presamples = round(row["presample_accuracy"] * row["presamples"])
    assert row["trained_samples"] == row["accepted_samples"] + accepted_presamples


def test_budget_inclusive_defaults_to_the_uniform_budget(warm_checkpoint, easy_prompts):
    config = small_config(
        warm_checkpoint,
        easy_prompts,
        "allocation=gvm",
        "gvm.presamples=2",
        "gvm.budget_inclusive=true",
    )
    assert (
        config.gvm_budget == 4 * PROMPTS
    )  # samples_per_prompt x prompts, of which 2 x PROMPTS are pre-samples
    assert (
        small_config(warm_checkpoint, easy_prompts, "allocation=gvm", "gvm.presamples=2").gvm_budget
        == 2 * PROMPTS
    )


def test_measured_subset_takes_the_first_accepted_of_each_prompt():
    group = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    accepted = np.array([1, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    assert measured_subset(group, accepted, None).tolist() == [0, 2, 3, 4, 5]
    assert measured_subset(group, accepted, 1).tolist() == [0, 3]
    assert measured_subset(group, accepted, 2).tolist() == [0, 2, 3, 4]


def test_grad_norm_samples_averages_the_first_accepted_presamples(
    tmp_path, warm_checkpoint, easy_prompts
):
    trainer = Trainer(
        small_config(warm_checkpoint, easy_prompts, "allocation=gvm", "gvm.grad_norm_samples=1"),
        tmp_path / "run",
    )
    presamples = _rollouts(trainer)  # every third sample accepted, 4 per prompt
    context = trainer._allocation_context(1, lambda phase: nullcontext())
    p, g = trainer.allocator.estimate_prompt_stats(presamples, PROMPTS, context.grad_norms)
    first = {}
    for j in np.flatnonzero(presamples.scores > 0.5):
        first.setdefault(int(presamples.group[j]), j)
    norms = sequence_grad_norms(
        trainer.model,
        [presamples.samples[j].prompt_ids for j in first.values()],
        [presamples.samples[j].response_ids for j in first.values()],
        trainer.tokenizer.pad_token_id,
    ).numpy()
    expected = np.zeros(PROMPTS)
    expected[list(first)] = norms
    np.testing.assert_allclose(g, expected, rtol=1e-4)
    assert p.tolist() == [
        (presamples.scores[presamples.group == i] > 0.5).mean() for i in range(PROMPTS)
    ]


def test_uniform_share_keeps_sampling_when_no_presample_was_accepted(
    tmp_path, warm_checkpoint, easy_prompts
):
    nothing_accepted = np.zeros(PROMPTS)
    paper = Trainer(small_config(warm_checkpoint, easy_prompts, "allocation=gvm"), tmp_path / "a")
    logged = []
    sizes = paper.allocator.sizes(nothing_accepted, nothing_accepted, PROMPTS, logged.append)
    assert sizes.sum() == 0
    assert logged and "no prompt qualified" in logged[0]
    mixed = Trainer(
        small_config(warm_checkpoint, easy_prompts, "allocation=gvm", "gvm.uniform_share=0.5"),
        tmp_path / "b",
    )
    # the default budget N' x prompts = 4 x 8, split evenly when the rule has nothing to go on
    sizes = mixed.allocator.sizes(nothing_accepted, nothing_accepted, PROMPTS, logged.append)
    assert sizes.tolist() == [4] * PROMPTS


def _rollouts(trainer: Trainer, seed: int = 0) -> Rollouts:
    prompts = trainer.stream.batch(1)
    rollouts = trainer.sample(prompts, [4] * len(prompts), iteration=1, phase=seed)
    # Hand-assigned verdicts so the test does not depend on the model being right.
    rollouts.scores = (np.arange(len(rollouts.samples)) % 3 == 0).astype(np.float64)
    return rollouts


def test_grpo_reports_the_share_of_samples_without_advantage(
    tmp_path, warm_checkpoint, easy_prompts
):
    config = small_config(warm_checkpoint, easy_prompts, "algorithm=grpo", "eval_data=null")
    trainer = Trainer(config, tmp_path)
    rollouts = _rollouts(trainer)
    group = np.asarray(rollouts.group)
    first, second = np.unique(group)[:2]
    rollouts.scores[group == first] = 1.0  # all right
    rollouts.scores[group == second] = 0.0  # all wrong
    flat = 0
    for g in np.unique(group):
        scores = rollouts.scores[group == g]
        if len(scores) < 2 or len(set(scores.tolist())) == 1:
            flat += len(scores)
    assert flat >= 8
    share = trainer.update(rollouts, iteration=1)["zero_advantage_share"]
    assert share == pytest.approx(flat / len(group))


@pytest.mark.parametrize("algorithm", ["raft", "raft++", "grpo"])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_micro_batching_does_not_change_the_update(
    tmp_path, warm_checkpoint, easy_prompts, algorithm
):
    """The gradient accumulated over micro-batches of 1 equals the whole mini-batch's gradient."""
    grads = []
    for micro in (1, 64):
        config = small_config(
            warm_checkpoint,
            easy_prompts,
            f"algorithm={algorithm}",
            "update.minibatch_size=8",
            f"update.micro_batch_size={micro}",
            "optim.grad_clip=0",
            "eval_data=null",
        )
        trainer = Trainer(config, tmp_path / f"micro{micro}")
        grads.append(update_gradient(trainer, _rollouts(trainer))[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pytest --gpu")
@pytest.mark.parametrize("algorithm", ["raft++", "grpo"])
@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_an_update_on_the_gpu_takes_the_cpu_gradient(
    tmp_path, warm_checkpoint, easy_prompts, algorithm
):
    """The same rollouts trained on in float32 on the CPU and on CUDA: every tensor of the
    update (advantages, token weights, pi_old, the KL reference, micro-batches) on one device."""
    grads, rollouts = [], None
    for device in ("cpu", "cuda"):
        config = small_config(
            warm_checkpoint,
            easy_prompts,
            f"algorithm={algorithm}",
            f"device={device}",
            "compute_dtype=float32",
            "loss.kl_coef=0.01",
            "update.minibatch_size=8",
            "update.micro_batch_size=3",
            "optim.grad_clip=0",
            "eval_data=null",
        )
        trainer = Trainer(config, tmp_path / device)
        rollouts = rollouts or _rollouts(trainer)
        grads.append(update_gradient(trainer, rollouts)[1])
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=1e-6)


def test_raft_trains_only_on_accepted_samples(tmp_path, warm_checkpoint, easy_prompts):
    config = small_config(
        warm_checkpoint, easy_prompts, "algorithm=raft", "eval_data=null", "optim.lr=3e-4"
    )
    trainer = Trainer(config, tmp_path)
    rollouts = _rollouts(trainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rejected = rollouts.select(rollouts.scores == 0)
    assert trainer.update(rejected, iteration=1)["optimizer_steps"] == 0
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())

    accepted = rollouts.select(rollouts.scores > 0)

    def mean_logprob():
        from gvmrl.batching import token_logprobs

        batch = trainer._pack(accepted.samples)
        with torch.no_grad():
            logp = token_logprobs(trainer.model, batch)
        return float((logp * batch.response_mask).sum() / batch.response_mask.sum())

    start = mean_logprob()
    for _ in range(3):
        trainer.update(accepted, iteration=1)
    assert mean_logprob() > start + 0.01


def _comparable(rows):
    return [
        {k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time_")} for r in rows
    ]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path, warm_checkpoint, easy_prompts):
    """kill -9 mid-run, rerun the same command: same metrics (wall time aside) and final weights."""
    args = [*small_overrides(warm_checkpoint, easy_prompts), "allocation=gvm", "iterations=5"]
    command = [sys.executable, "-m", "gvmrl", "train", *[a for s in args for a in ("--set", s)]]

    subprocess.run(
        [*command, "--output-dir", str(tmp_path / "whole")], check=True, capture_output=True
    )

    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        [*command, "--output-dir", str(broken)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while (
        time.time() < deadline
        and len(
            read_metrics(broken / "metrics.jsonl") if (broken / "metrics.jsonl").exists() else []
        )
        < 3
    ):
        time.sleep(0.05)
    time.sleep(0.3)  # land somewhere inside the next iteration or its checkpoint write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    state = json.loads((broken / "checkpoints" / "latest" / "state.json").read_text())
    assert 1 <= state["iteration"] < 5, "the kill should interrupt the run"

    subprocess.run([*command, "--output-dir", str(broken)], check=True, capture_output=True)
    whole, resumed = (
        read_metrics(tmp_path / "whole" / "metrics.jsonl"),
        read_metrics(broken / "metrics.jsonl"),
    )
    assert [r["iteration"] for r in resumed] == list(range(6))
    assert _comparable(resumed) == _comparable(whole)
    a, b = (
        load_file(tmp_path / "whole" / "final" / "model.safetensors"),
        load_file(broken / "final" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rerun_of_finished_run_keeps_its_final_weights(tmp_path, warm_checkpoint, easy_prompts):
    """Rerunning a finished run is a no-op; extending it (more iterations) trains and re-saves."""
    config = small_config(warm_checkpoint, easy_prompts, "iterations=1", "eval.every=0")
    Trainer(config, tmp_path).run()
    marker = tmp_path / "final" / "marker"
    marker.write_text("written after the run")
    rows = read_metrics(tmp_path / "metrics.jsonl")

    Trainer(config, tmp_path).run()
    assert marker.exists(), "a finished run's final weights were rewritten"
    assert read_metrics(tmp_path / "metrics.jsonl") == rows

    extended = small_config(warm_checkpoint, easy_prompts, "iterations=2", "eval.every=0")
    Trainer(extended, tmp_path).run()
    assert not marker.exists(), "an extended run must save its new final weights"
    assert [r["iteration"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
