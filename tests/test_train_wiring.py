"""What the trainer wires in from other modules: prompts checked against the model's context at
load, pi_old recomputed or taken from the rollout (with the TIS weight), micro-batching by a
token budget, precision and gradient checkpointing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_vllm_engine import FakeLLM, fake_vllm  # noqa: F401 (fixture)

from gvmrl.activation_checkpointing import is_gradient_checkpointing
from gvmrl.cli import main
from gvmrl.config import ConfigError, load_config
from gvmrl.rewards import REWARDS
from gvmrl.train import Trainer

LONG_PROBLEM = "1+" * 600 + "1"  # ~1200 characters: far past the built-in model's 512 positions


def builtin_run(*extra: str) -> list[str]:
    return [
        "model=builtin",
        "train_data=builtin:train",
        "eval_data=null",
        "prompts_per_iteration=4",
        "samples_per_prompt=4",
        "rollout.max_new_tokens=24",
        "update.minibatch_size=4",
        "logging.progress=false",
        "logging.tensorboard=false",
        "threads=1",
        *extra,
    ]


@pytest.fixture
def prompts_with_two_overlong(tmp_path):
    rows = [{"id": f"p{i}", "problem": f"{i}+{i}", "answer": str(2 * i)} for i in range(8)]
    rows[3] = {"id": "long-a", "problem": LONG_PROBLEM, "answer": "601"}
    rows[6] = {"id": "long-b", "problem": LONG_PROBLEM + "+1", "answer": "602"}
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_overlong_prompts_are_skipped_and_counted_at_load(
    tmp_path, prompts_with_two_overlong, capsys
):
    data = prompts_with_two_overlong
    config = load_config(None, builtin_run(f"train_data={data}", f"eval_data={data}"))
    trainer = Trainer(config, tmp_path / "run")
    kept = [r.id for r in trainer.stream.records]
    assert len(kept) == 6 and "long-a" not in kept and "long-b" not in kept
    assert [r.id for r in trainer.eval_records] == kept
    err = capsys.readouterr().err
    # 512 positions - 24 new tokens leave 488 for the prompt; one line per split
    assert f"skipped 2 train prompts of {data} longer than 488 tokens" in err
    assert f"skipped 2 test prompts of {data} longer than 488 tokens" in err


def test_overlong_error_stops_before_anything_is_written(
    tmp_path, prompts_with_two_overlong, capsys
):
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out)]
    for override in builtin_run(f"train_data={prompts_with_two_overlong}", "data.overlong=error"):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(str(prompts_with_two_overlong)) and "'long-a'" in err
    assert not out.exists() or not any(out.iterdir())  # no config.yaml, no metrics


def _mixed_rollouts(trainer: Trainer, logprob_shift: float = 0.0):
    """Iteration 1's samples, 4 per prompt, with hand-assigned rewards 0, 1, 0, 1, ...: every
    group mixed (every sample carries a GRPO gradient; RAFT++ trains on the accepted half, A = 1),
    their sampling log-probs moved by `logprob_shift`."""
    prompts = trainer.stream.batch(1)
    rollouts = trainer.sample(prompts, [4] * len(prompts), iteration=1, phase=1)
    rollouts.scores = (np.arange(len(rollouts.samples)) % 2).astype(np.float64)
    for s in rollouts.samples:
        s.logprobs = [lp + logprob_shift for lp in s.logprobs]
    return rollouts


def update_gradient(trainer: Trainer, rollouts) -> tuple[dict, dict[str, torch.Tensor]]:
    """The M-step's metrics and the gradient its one optimizer step would apply (on the CPU)."""
    captured: dict[str, torch.Tensor] = {}

    def capture():  # stands in for optimizer.step
        named = trainer.model.named_parameters()
        captured.update({n: p.grad.cpu().clone() for n, p in named if p.grad is not None})

    trainer.optimizer.step = capture
    metrics = trainer.update(rollouts, iteration=1)
    assert metrics["optimizer_steps"] == 1 and metrics["skipped_steps"] == 0
    return metrics, captured


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_pi_old_recomputed_or_from_the_hf_rollout_gives_the_same_update(tmp_path):
    """The HF engine samples from the training weights, so its log-probs are pi_old: recomputing
    them (in token-budget micro-batches or not), taking them from the rollout, and the TIS weight
    (1 when the two agree) all give the same loss and gradient, up to round-off, and the reported
    rollout/trainer log-prob gap is round-off."""
    settings = {
        "rollout": ["loss.old_logprobs=rollout"],
        "recompute": ["loss.old_logprobs=recompute"],
        "recompute-by-tokens": ["update.max_tokens_per_micro_batch=150"],
        "recompute-tis": ["loss.tis_cap=2.0"],
    }
    common = ["algorithm=grpo", "optim.grad_clip=0"]
    rollouts = None
    results = {}
    for name, extra in settings.items():
        trainer = Trainer(load_config(None, builtin_run(*common, *extra)), tmp_path / name)
        if rollouts is None:
            rollouts = _mixed_rollouts(trainer)
        results[name] = update_gradient(trainer, rollouts)
    metrics, grads = results["rollout"]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads.values())
    for name in ("recompute", "recompute-by-tokens", "recompute-tis"):  # the same weights
        assert results[name][0]["rollout_logprob_gap"] < 1e-4, name
    for name, (other_metrics, other_grads) in results.items():
        assert other_metrics["loss"] == pytest.approx(metrics["loss"], rel=1e-4, abs=1e-6), name
        assert other_grads.keys() == grads.keys()
        for key in grads:
            torch.testing.assert_close(other_grads[key], grads[key], rtol=1e-3, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_old_logprobs_rollout_takes_pi_old_from_the_samples(tmp_path):
    """With the rollout's log-probs lowered by log 3, `loss.old_logprobs=rollout` puts every PPO
    ratio at 3, where `recompute` ignores them and keeps it at 1.

    By hand, from `gvmrl.losses.clipped_policy_loss` (RAFT++: the accepted half, A = max(r, 0)
    = 1; clip range [0.8, 1.2]; dual-clip only acts on A < 0), token-mean aggregation:
      rollout:   rho = exp(log pi - (log pi - log 3)) = 3; L = max(-A rho, -A clip(rho)) =
                 max(-3, -1.2) = -1.2 on every token, so loss -1.2; the clipped branch is active
                 on every token (clipfrac 1) and is constant in theta, so the gradient is 0;
                 approx_kl = (rho - 1) - log rho = 2 - log 3.
      recompute: rho = 1; L = max(-1, -1) = -1, loss -1, clipfrac 0, approx_kl 0, and the
                 gradient of -rho is that of -log pi, not 0.
    """
    common = ["algorithm=raft++", "optim.grad_clip=0", "loss.aggregation=token-mean"]
    rollouts = None
    results = {}
    for name in ("rollout", "recompute"):
        config = load_config(None, builtin_run(*common, f"loss.old_logprobs={name}"))
        trainer = Trainer(config, tmp_path / name)
        if rollouts is None:
            rollouts = _mixed_rollouts(trainer, logprob_shift=-float(np.log(3.0)))
        metrics, grads = update_gradient(trainer, rollouts)
        assert grads, name
        results[name] = metrics, max(float(g.abs().max()) for g in grads.values())
    rollout, rollout_grad = results["rollout"]
    assert rollout["loss"] == pytest.approx(-1.2, rel=1e-6)
    assert rollout["clipfrac"] == pytest.approx(1.0)
    assert rollout["approx_kl"] == pytest.approx(2.0 - np.log(3.0), abs=1e-4)
    assert rollout_grad == 0.0
    recompute, recompute_grad = results["recompute"]
    assert recompute["loss"] == pytest.approx(-1.0, rel=1e-5)
    assert recompute["clipfrac"] == 0.0
    assert recompute["approx_kl"] == pytest.approx(0.0, abs=1e-5)
    assert recompute_grad > 0.0
    # the sampler/trainer mismatch is reported when pi_old is recomputed: log 3 on every token
    assert recompute["rollout_logprob_gap"] == pytest.approx(np.log(3.0), abs=1e-4)
    assert "rollout_logprob_gap" not in rollout


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
def test_tis_weight_scales_each_tokens_loss_when_the_sampler_differs(tmp_path):
    """With rollout log-probs lower than pi_old by log 3 everywhere, every token's weight is
    min(3, cap): the loss is cap times the unweighted one (ratio 1 at the first step)."""
    # RAFT++ on the accepted half: A = 1, so at ratio 1 the loss is -1 per token (token-mean)
    common = ["algorithm=raft++", "optim.grad_clip=0", "loss.aggregation=token-mean"]
    losses = {}
    rollouts = None
    for name, extra in {"plain": [], "tis": ["loss.tis_cap=2.0"]}.items():
        trainer = Trainer(load_config(None, builtin_run(*common, *extra)), tmp_path / name)
        if rollouts is None:
            rollouts = _mixed_rollouts(trainer, logprob_shift=-float(np.log(3.0)))
        trainer.optimizer.step = lambda: None
        losses[name] = trainer.update(rollouts, iteration=1)["loss"]
    assert losses["plain"] == pytest.approx(-1.0, rel=1e-5)
    assert losses["tis"] == pytest.approx(-2.0, rel=1e-5)


def test_precision_and_gradient_checkpointing_reach_the_models(tmp_path, monkeypatch):
    """fp32 master weights, a bf16 reference model, bf16 autocast for every pass (on CPU here),
    checkpointed decoder layers; an iteration trains and stays finite."""
    calls = iter(range(10**6))
    monkeypatch.setitem(REWARDS, "answer", lambda grade, text: float(next(calls) % 2))
    config = load_config(
        None,
        builtin_run(
            "algorithm=grpo",
            "dtype=float32",
            "compute_dtype=bfloat16",
            "gradient_checkpointing=true",
            "loss.kl_coef=0.01",
            "iterations=1",
        ),
    )
    trainer = Trainer(config, tmp_path)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {p.dtype for p in trainer.reference.parameters()} == {torch.bfloat16}
    assert is_gradient_checkpointing(trainer.model)
    # (grad enabled, output dtype) of a projection in each pass: the policy's weights are fp32,
    # so its bf16 outputs come from autocast (the reference's weights are bf16 themselves)
    passes: dict[str, list[tuple[bool, torch.dtype]]] = {"policy": [], "reference": []}
    for name, model in (("policy", trainer.model), ("reference", trainer.reference)):
        model.model.layers[0].self_attn.q_proj.register_forward_hook(
            lambda m, i, out, seen=passes[name]: seen.append((torch.is_grad_enabled(), out.dtype))
        )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.run()
    update = [dtype for grad, dtype in passes["policy"] if grad]
    no_grad = [dtype for grad, dtype in passes["policy"] if not grad]  # rollout, pi_old
    assert update and set(update) == {torch.bfloat16}
    assert no_grad and set(no_grad) == {torch.bfloat16}
    assert passes["reference"] and {dtype for _, dtype in passes["reference"]} == {torch.bfloat16}
    assert metrics["optimizer_steps"] == 1 and np.isfinite(metrics["loss"])
    assert metrics["kl"] >= 0 and np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
    after = dict(trainer.model.named_parameters())
    assert all(bool(torch.isfinite(p).all()) for p in after.values())
    assert all(p.dtype == torch.float32 for p in after.values())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert trainer.model.model.embed_tokens.weight.grad is None  # freed after the step


@pytest.mark.usefixtures("fake_vllm")
def test_the_vllm_section_reaches_the_engine(tmp_path):
    """`rollout.vllm` and the compute dtype are what the trainer builds vLLM with (a stand-in
    `vllm` module records the call; tests/test_vllm_engine.py)."""
    config = load_config(
        None,
        builtin_run(
            "rollout.engine=vllm",
            "compute_dtype=bfloat16",
            "rollout.gpu_memory_utilization=0.3",
            "rollout.vllm.max_num_seqs=64",
            "rollout.vllm.enforce_eager=true",
            "rollout.vllm.sleep_level=1",
            "rollout.vllm.options={kv_cache_dtype: fp8}",
        ),
    )
    Trainer(config, tmp_path)
    (llm,) = FakeLLM.instances
    expected = {
        "dtype": "bfloat16",  # the compute dtype, explicit: the trainer keeps fp32 weights
        "gpu_memory_utilization": 0.3,
        "max_num_seqs": 64,
        "enforce_eager": True,
        "enable_sleep_mode": True,
        "kv_cache_dtype": "fp8",
        "seed": config.seed,
    }
    assert {k: llm.kwargs[k] for k in expected} == expected
    assert llm.calls[-1] == ("sleep", 1)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_a_gpu_this_machine_lacks_stops_in_one_line_before_loading(
    tmp_path, monkeypatch, capsys, device
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    out = tmp_path / "run"
    args = ["train", "--output-dir", str(out)]
    for override in builtin_run(f"device={device}"):
        args += ["--set", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith(f"gvmrl train: device: {device} asked for") and "sees no GPU" in err
    assert not out.exists() or not any(out.iterdir())


def test_device_names_are_checked_against_this_machine():
    from gvmrl.distributed.context import resolve_device_type
    from gvmrl.runtime import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^device: cuda:\d+ asked for"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")  # one past the last visible GPU
    with pytest.raises(ConfigError, match=r"^device: 'meta' is not cpu, cuda"):
        resolve_device("meta")
    with pytest.raises(ConfigError, match=r"^device: cuda:1 under torchrun; .* set device=cuda"):
        resolve_device_type("cuda:1")


def test_vllm_on_a_gpu_other_than_the_first_is_refused_at_config():
    with pytest.raises(ConfigError, match=r"^device: cuda:1 with rollout.engine vllm"):
        load_config(None, ["rollout.engine=vllm", "device=cuda:1"])
    with pytest.raises(ConfigError, match=r"^device: cpu, cuda\[:N\] or auto"):
        load_config(None, ["device=cuda:x"])
