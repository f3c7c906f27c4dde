"""Multi-process training on CPU with gloo: the gvmrl.distributed pieces and `gvmrl train`
itself on 2 torchrun processes against one process, sharded checkpoints, failure of a rank;
single-process pieces too."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from gvmrl.batching import pack_sequences, token_logprobs
from gvmrl.config import ConfigError
from gvmrl.distributed.checkpoint import load_sharded_checkpoint
from gvmrl.distributed.context import init_process_context, launch_environment
from gvmrl.distributed.reduction import (
    gather_rows,
    pad_to_common_count,
    padding_batch,
)
from gvmrl.losses import token_weights

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker as worker  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
SINGLE = init_process_context("cpu", environ={})  # world size 1, no process group


def run_job(command: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a torchrun job in a session of its own, so that a timeout kills its ranks with the
    launcher: a failing test leaves no worker behind on the shared cores."""
    with subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as job:
        try:
            stdout, stderr = job.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(command, job.returncode, stdout, stderr)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the worker on 2 CPU processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    return run_job([*command, str(WORKER), *args], env, timeout)


def make_inputs(root: Path) -> tuple[Path, dict]:
    """A random tiny policy of the built-in architecture, and a global batch whose dealing gives
    rank 0 two rows and rank 1 six (one micro-batch against three: rank 0 pads two)."""
    from transformers import AutoModelForCausalLM

    from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer

    torch.manual_seed(0)
    tokenizer = builtin_tokenizer()
    model = AutoModelForCausalLM.from_config(builtin_model_config(tokenizer))
    init = root / "init"
    model.save_pretrained(init)
    tokenizer.save_pretrained(init)
    rng = np.random.default_rng(0)
    group = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    responses = [rng.integers(6, len(tokenizer), rng.integers(3, 13)).tolist() for _ in group]
    batch = {
        "prompts": [rng.integers(6, len(tokenizer), rng.integers(4, 11)).tolist() for _ in group],
        "responses": responses,
        "group": group,
        "response_lengths": np.array([len(r) for r in responses]),
        "expected_tokens": np.array([100.0, 10.0, 10.0, 10.0]),
        "pad_id": tokenizer.pad_token_id,
        "table": rng.normal(size=(7, 3)),
    }
    torch.save(batch, root / "batch.pt")
    return init, batch


def reference_steps(init: Path, batch: dict, model=None, optimizer=None, steps: int = 3):
    """One process, no sharding, the whole batch in one forward: (model, grad norms)."""
    from transformers import AutoModelForCausalLM

    if model is None:
        model = AutoModelForCausalLM.from_pretrained(init)
        optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    packed = pack_sequences(batch["prompts"], batch["responses"], batch["pad_id"])
    group = torch.as_tensor(batch["group"])
    weights = token_weights(packed.response_mask, worker.AGGREGATION, group)
    norms = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        (-(token_logprobs(model, packed) * weights)).sum().backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), worker.CLIP)))
        optimizer.step()
    return model, norms


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    init, batch = make_inputs(root)
    result = torchrun("train", str(init), str(root / "batch.pt"), str(root / "out"))
    assert result.returncode == 0, result.stderr[-3000:]
    return init, batch, root / "out", torch.load(root / "out" / "result.pt", weights_only=False)


def max_abs_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_two_process_fsdp_matches_one_process(two_process_run):
    init, batch, _, result = two_process_run
    reference, norms = reference_steps(init, batch)
    assert min(norms) > worker.CLIP  # clipping acts, so the global norm matters
    assert np.allclose(result["norms"], norms, rtol=1e-5, atol=0)  # summed, not averaged
    assert max_abs_difference(result["weights"], reference.state_dict()) < 1e-5
    initial = reference_steps(init, batch, steps=0)[0].state_dict()
    assert max_abs_difference(result["weights"], initial) > 1e-4  # they moved: 3 steps of 1e-4


def test_gather_rows_gives_every_rank_the_whole_table(two_process_run):
    _, batch, _, result = two_process_run
    assert np.array_equal(result["gathered"], batch["table"])


def test_sharded_checkpoint_resumes_exactly(two_process_run):
    init, batch, out, result = two_process_run
    assert result["state"] == {"iteration": 2}
    assert result["resumed_norm"] == result["norms"][2]
    assert max_abs_difference(result["resumed"], result["weights"]) == 0.0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["latest"]  # no temporary left


def test_sharded_checkpoint_resumes_in_one_process(two_process_run):
    """DCP reshards: the 2-rank checkpoint loads into a plain model and optimizer."""
    from transformers import AutoModelForCausalLM

    init, batch, out, result = two_process_run
    model = AutoModelForCausalLM.from_pretrained(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=worker.LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    latest = out / "checkpoints" / "latest"
    load_sharded_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler, rank=0)
    assert scheduler.last_epoch == 2
    model, norms = reference_steps(init, batch, model, optimizer, steps=1)
    assert norms[0] == pytest.approx(result["norms"][2], rel=1e-5)
    assert max_abs_difference(model.state_dict(), result["weights"]) < 1e-5


def test_final_checkpoint_is_plain_hugging_face(two_process_run):
    from transformers import AutoModelForCausalLM

    _, _, out, result = two_process_run
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert max_abs_difference(final.state_dict(), result["weights"]) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_failed_rank_ends_the_job_non_zero(mode):
    """kill: rank 1 is SIGKILLed; hang: rank 1 stops calling collectives while alive (for an
    hour), so only the process group's timeout (5 s here) can end rank 0's wait. The bound is
    the subprocess timeout (a job still running then raises TimeoutExpired); stderr says what
    ended the job, not the wall time from launch, which includes torchrun's start-up."""
    result = torchrun(mode, timeout=180)
    assert result.returncode != 0
    # torchrun's summary: each failed rank with its exit code (a signal as minus its number)
    summary = result.stderr.rpartition("Failures:")[2]
    entry = r"^\s*rank\s*:\s*(\d+).*\n(?:.*\n)*?\s*exitcode\s*:\s*(-?\d+)"
    ended = dict(re.findall(entry, summary, re.MULTILINE))  # {rank: exit code}
    if mode == "kill":
        assert ended.get("1") == "-9", result.stderr[-3000:]  # rank 1's SIGKILL was reported
    else:
        # rank 0's all_reduce gave up after the group's 5 s timeout and rank 0 exited with it;
        # rank 1, still asleep, was stopped by torchrun (SIGTERM) if at all
        assert ended.get("0") == "1" and ended.get("1", "-15") == "-15", result.stderr[-3000:]
        assert re.search(r"\[rank0\]: RuntimeError: .*Timed out waiting 5000ms", result.stderr), (
            result.stderr[-3000:]
        )


# ---------------------------------------------------------------------------------------------
# The trainer under torchrun: `gvmrl train` on 2 processes against one

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SETTINGS = (
    "iterations=3",
    "prompts_per_iteration=8",
    "samples_per_prompt=4",
    "gvm.presamples=4",
    "rollout.max_new_tokens=32",
    "update.minibatch_size=4",
    "eval.every=3",
    "eval.samples=2",
    "data.eval_limit=5",  # 2 + 3 records: uneven evaluation slices
    "threads=1",
    "logging.progress=false",
    "logging.tensorboard=false",
)
# what depends on which samples were drawn and how they were graded: equal, not close
EXACT_METRICS = (
    "samples_per_prompt",
    "samples_generated",
    "tokens_generated",
    "samples",
    "presamples",
    "accepted_samples",
    "trained_samples",
    "total_optimizer_steps",
    "train_accuracy",
    "presample_accuracy",
    "response_tokens_mean",
    "eval_accuracy",
)


def train_command(
    config: str | None, out: Path, processes: int, settings: Sequence[str] = TRAIN_SETTINGS
) -> list[str]:
    """`gvmrl train` with a preset from configs/ (or none) and `--set` settings, under torchrun
    when `processes` > 1."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    arguments = ["--output-dir", str(out), *(arg for s in settings for arg in ("--set", s))]
    if config is not None:
        arguments = ["--config", str(ROOT / "configs" / f"{config}.yaml"), *arguments]
    return [*launcher, "-m", "gvmrl", "train", *arguments]


def train_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def run_training(config: str, out: Path, processes: int) -> None:
    result = run_job(train_command(config, out, processes), train_env(), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def metrics_rows(out: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """RAFT++-GVM and GRPO-GVM, 3 iterations each, on 1 and on 2 processes."""
    root = tmp_path_factory.mktemp("trainer")
    runs = {}
    for config in ("builtin-raftpp-gvm", "builtin-grpo-gvm"):
        for processes in (1, 2):
            out = root / f"{config}-{processes}"
            run_training(config, out, processes)
            runs[config, processes] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("config", ["builtin-raftpp-gvm", "builtin-grpo-gvm"])
def test_two_process_training_matches_one_process(trainer_runs, config):
    one, two = trainer_runs[config, 1], trainer_runs[config, 2]
    rows_one, rows_two = metrics_rows(one), metrics_rows(two)
    assert [r["world_size"] for r in rows_one] == [1] * 4  # iteration 0 (eval), 1, 2, 3
    assert [r["world_size"] for r in rows_two] == [2] * 4
    # the run is not trivial: GVM allocated samples and the policy took steps
    assert sum(sum(r.get("samples_per_prompt", [])) for r in rows_one) > 0
    assert rows_one[-1]["total_optimizer_steps"] > 0
    assert "eval_accuracy" in rows_one[-1]
    for a, b in zip(rows_one, rows_two, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("time_") or key in ("wall_time", "world_size"):
                continue
            if key in EXACT_METRICS or not isinstance(a[key], float):
                assert a[key] == b[key], key  # same allocation, same samples, same grades
            else:  # float sums in another order
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6, nan_ok=True), key
    assert max_abs_difference(final_weights(one), final_weights(two)) < 1e-5


def worker_pids(launcher_pid: int) -> dict[int, int]:
    """rank -> pid of the processes torchrun's agent `launcher_pid` started."""
    ranks = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if parent != launcher_pid:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                ranks[int(entry[5:])] = int(stat.parent.name)
    return ranks


@pytest.mark.slow
def test_killed_rank_ends_the_job_and_a_rerun_resumes_to_the_same_weights(
    trainer_runs, tmp_path
):
    out = tmp_path / "killed"
    command = train_command("builtin-raftpp-gvm", out, 2)
    job = subprocess.Popen(
        command,
        env=train_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # so that a failing test can kill every rank (finally:)
    )
    state = out / "checkpoints" / "latest" / "state.json"
    deadline = time.monotonic() + 400
    try:
        while not state.exists() or '"iteration": 1' not in state.read_text():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint of iter. 1"
            time.sleep(0.2)
        os.kill(worker_pids(job.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    assert time.monotonic() - killed < 60, stderr[-2000:]
    assert not (out / "final").exists()

    run_training("builtin-raftpp-gvm", out, 2)  # the same command resumes
    uninterrupted = trainer_runs["builtin-raftpp-gvm", 2]
    assert max_abs_difference(final_weights(out), final_weights(uninterrupted)) < 1e-6
    assert [r["iteration"] for r in metrics_rows(out)] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------
# Single-process pieces


def test_launch_environment():
    assert launch_environment({}) is None
    assert launch_environment({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (1, 4, 1)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        launch_environment({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="inconsistent"):
        launch_environment({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


def test_more_ranks_on_a_node_than_gpus_is_a_config_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU node: the second rank names the cause before
    it touches CUDA or the process group."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device called"))
    environ = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    with pytest.raises(ConfigError, match=r"^device: the rank of LOCAL_RANK 1 needs GPU 1, but 1"):
        init_process_context("cuda", environ=environ)


def test_stray_launch_variable_is_one_line_user_error(monkeypatch, capsys, tmp_path):
    """RANK left set in a shell (no WORLD_SIZE/LOCAL_RANK): exit 2, one line, no traceback."""
    from gvmrl.cli import main

    monkeypatch.setenv("RANK", "1")
    for name in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    code = main(["train", "--set", "model=builtin", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "RANK set but LOCAL_RANK, WORLD_SIZE not" in err[0]
    assert not (tmp_path / "run").exists()


def test_no_launcher_means_one_process_without_group():
    assert (SINGLE.rank, SINGLE.world_size, SINGLE.grouped) == (0, 1, False)


def test_gather_rows_of_a_rank_without_rows():
    assert gather_rows([], np.zeros((0, 2)), 0, SINGLE).shape == (0, 2)


def test_gather_rows_rejects_a_row_given_twice_or_missing():
    table = gather_rows([2, 0, 1], [[1.0], [2.0], [np.nan]], 3, SINGLE)
    assert table[0, 0] == 2.0 and table[2, 0] == 1.0 and np.isnan(table[1, 0])
    with pytest.raises(ValueError, match="row 0 is given by 2"):
        gather_rows([0, 0, 1], np.ones((3, 1)), 2, SINGLE)
    with pytest.raises(ValueError, match="row 1 is given by 0"):
        gather_rows([0], np.ones((1, 1)), 2, SINGLE)


def test_padding_batch_adds_nothing_to_the_gradient():
    from transformers import AutoModelForCausalLM

    from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer

    tokenizer = builtin_tokenizer()
    model = AutoModelForCausalLM.from_config(builtin_model_config(tokenizer))
    pad = padding_batch(tokenizer.pad_token_id)
    assert pad_to_common_count([], lambda: pad, SINGLE) == []  # one rank: nothing to match
    logp = token_logprobs(model, pad)
    (logp * pad.response_mask).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # every parameter reached, all 0
