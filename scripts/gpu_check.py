"""Device check of the GPU path (issue 20): run from a source checkout on one GPU, no network.

    python scripts/gpu_check.py --output gpu_check.json          # H200: under 8 minutes
    python scripts/gpu_check.py --smoke --output smoke.json      # tiny sizes, CPU, seconds

(a) exact per-sample gradient norms in bf16 (embed_tokens, the paper's group): batched
    (`gvmrl.estimation.per_sample_grad_norms`) vs one backward per sample, on a randomly
    initialised model of Qwen2.5-Math-1.5B's shape (gvmrl/model_configs), 32 responses x 1024
    tokens; target speedup >= 10x (goal 20x).
(b) one GVM-GRPO iteration through the public trainer (`gvmrl.train.train`) with the HF engine
    on that model at 2048-token responses: time per phase (metrics.jsonl) and peak GPU memory,
    beside `gvmrl plan`'s estimate for the same config. Random weights accept no sample, so
    the iteration's stats phase measures no norm (that is (a)) and GRPO's advantages are 0; the
    phases still run their full forward/backward passes. The tokenizer is gvmrl's built-in
    character-level one (no network for Qwen's), under the model's 151936-entry vocabulary.
(c) fp32 master weights with bf16 autocast: share of a 1536 x 1536 matrix one AdamW step at
    lr 1e-6 changes, against bf16 weights.
(d) the job path on this device: `gvmrl train` under torchrun with one process (NCCL on a GPU,
    FSDP2 with bf16 compute, DCP checkpoints, the replica's weight sync) against plain
    `gvmrl train`, GRPO-GVM on the built-in model for 2 iterations: exit status, seconds, and
    how far apart the two runs' samples and final weights are (reported, not asserted: on a GPU
    the two precisions' kernels differ; equal generated token counts mean equal samples in
    practice).

Writes one JSON of figures, rewritten after each part (a part that fails records its error and
the others still run; exit status 1), and prints it. Without --smoke on a machine where torch
sees no GPU it stops at once (exit status 2) rather than run the full sizes on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout

from gvmrl.batching import pack_sequences, token_logprobs  # noqa: E402
from gvmrl.config import load_config  # noqa: E402
from gvmrl.estimation import per_sample_grad_norms  # noqa: E402
from gvmrl.io import write_json  # noqa: E402
from gvmrl.memory import load_model_config, plan_dict, plan_memory  # noqa: E402
from gvmrl.precision import changed_share_after_step, resolve_precision  # noqa: E402

MODEL = "Qwen/Qwen2.5-Math-1.5B"
FULL = {"responses": 32, "response_tokens": 1024, "prompt_tokens": 128, "iteration_tokens": 2048}
SMOKE = {"responses": 4, "response_tokens": 24, "prompt_tokens": 8, "iteration_tokens": 12}
SMOKE_SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=512,
)  # fmt: skip


def model_config(smoke: bool, **overrides: Any):
    """Qwen2.5-Math-1.5B's shipped config (tiny shapes with `smoke`), with `overrides`."""
    config = load_model_config(MODEL)
    values = {k: v for k, v in config.to_dict().items() if k != "layer_types"}
    values.update(SMOKE_SHAPE if smoke else {}, **overrides)
    return type(config)(**values)


def random_model(config, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with device:  # initialised where it runs: 1.5B parameters take seconds on a GPU
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def check_grad_norms(sizes: dict[str, int], smoke: bool, device: torch.device) -> dict[str, Any]:
    """(a): batched exact norms vs one backward per sample, both bf16 (as the reference code)."""
    model = random_model(model_config(smoke), torch.bfloat16, device)
    g = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    prompts = torch.randint(1, vocab, (sizes["responses"], sizes["prompt_tokens"]), generator=g)
    responses = torch.randint(1, vocab, (sizes["responses"], sizes["response_tokens"]), generator=g)
    batch = pack_sequences(prompts.tolist(), responses.tolist(), pad_id=0).to(device)
    args = (model, batch.input_ids, batch.attention_mask, batch.response_mask, "embed_tokens")
    per_sample_grad_norms(*args)  # warm-up: the timed call's kernels and allocator blocks
    synchronize(device)
    start = time.perf_counter()
    batched = per_sample_grad_norms(*args).float().cpu()
    synchronize(device)
    batched_s = time.perf_counter() - start

    embedding = model.get_input_embeddings().weight
    model.train(False)
    loop = torch.zeros(len(batch))
    start = time.perf_counter()
    for b in range(len(batch)):
        model.zero_grad(set_to_none=True)
        row = batch.select(b)
        logp = token_logprobs(model, row)
        (-(logp * row.response_mask).sum()).backward()
        loop[b] = embedding.grad.float().norm().cpu()
    synchronize(device)
    loop_s = time.perf_counter() - start
    relative = ((batched - loop).abs() / loop.clamp(min=1e-12)).max().item()
    return {
        "responses": sizes["responses"],
        "response_tokens": sizes["response_tokens"],
        "batched_seconds": batched_s,
        "one_backward_per_sample_seconds": loop_s,
        "speedup": loop_s / batched_s,
        "target_speedup": 10.0,
        "max_relative_difference": relative,
        "norm_mean": batched.mean().item(),
    }


def check_iteration(sizes: dict[str, int], smoke: bool, device: torch.device) -> dict[str, Any]:
    """(b): one GVM-GRPO iteration through gvmrl.train.train, HF engine."""
    from gvmrl.builtin.model import builtin_tokenizer
    from gvmrl.train import train

    work = Path(tempfile.mkdtemp(prefix="gvmrl-gpu-check-"))
    tokenizer = builtin_tokenizer()
    config = model_config(
        smoke, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    random_model(config, torch.float32, torch.device("cpu")).save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    overrides = [
        "algorithm=grpo",
        "allocation=gvm",
        "iterations=1",
        f"model={work / 'model'}",
        "train_data=builtin:train",
        "eval_data=null",
        f"prompts_per_iteration={4 if smoke else 16}",
        "gvm.presamples=4",
        "gvm.uniform_share=0.5",  # random weights accept nothing: keep samples flowing
        f"rollout.max_new_tokens={sizes['iteration_tokens']}",
        "rollout.batch_size=64",
        f"device={device.type}",
        "dtype=float32",
        "compute_dtype=auto",
        "gradient_checkpointing=true",
        "update.minibatch_size=16",
        "update.max_tokens_per_micro_batch=16384",
        "optim.lr=1e-6",
        "loss.kl_coef=0.001",
        "logging.tensorboard=false",
        "logging.progress=false",
        "save_final=false",
    ]
    run_config = load_config(None, overrides)
    if device.type == "cuda":
        gc.collect()  # the earlier parts' tensors must not count in this part's peak
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        metrics = train(run_config, work / "run")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    plan = plan_memory(run_config, 141.0, config)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "response_tokens": sizes["iteration_tokens"],
        "seconds": seconds,
        "phase_seconds": {k: v for k, v in metrics.items() if k.startswith("time_")},
        "samples": metrics.get("samples"),
        "response_tokens_mean": metrics.get("response_tokens_mean"),
        "peak_allocated_gib": peak,
        "plan_update_peak_gib": plan.update_peak / 2**30,
        "plan_rollout_peak_gib": plan.rollout_peak / 2**30,
        "plan": plan_dict(plan),
        "overrides": overrides,
    }


def check_master_weights(smoke: bool, device: torch.device) -> dict[str, Any]:
    """(c): one AdamW step at lr 1e-6 on a 1536 x 1536 matrix (q_proj of the 1.5B shape)."""
    config = model_config(smoke, num_hidden_layers=1)
    g = torch.Generator().manual_seed(2)
    input_ids = torch.randint(1, config.vocab_size, (2, 64), generator=g).to(device)
    out: dict[str, Any] = {"lr": 1e-6}
    for name, dtype, compute in (
        ("fp32_master_bf16_compute", "float32", "bfloat16"),
        ("bf16_weights", "bfloat16", "bfloat16"),
    ):
        precision = resolve_precision(dtype, compute, device)
        model = random_model(config, precision.param_dtype, device)
        weight = model.model.layers[0].self_attn.q_proj.weight
        out["matrix"] = list(weight.shape)
        out[name] = changed_share_after_step(model, precision, input_ids, weight, lr=1e-6)
    return out


JOB_TIMEOUT_S = 150  # each run takes well under a minute; a hang must leave time for (b)
JOB_SETTINGS = (
    "iterations=2",
    "prompts_per_iteration=8",
    "samples_per_prompt=4",
    "gvm.presamples=4",
    "rollout.max_new_tokens=32",
    "update.minibatch_size=4",
    "eval.every=0",
    "logging.progress=false",
    "logging.tensorboard=false",
)


def check_job(device: torch.device) -> dict[str, Any]:
    """(d): `gvmrl train` plain and under torchrun (one process), same config and seed."""
    from safetensors.torch import load_file

    work = Path(tempfile.mkdtemp(prefix="gvmrl-gpu-check-job-"))
    launchers = {
        "plain": [sys.executable],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node=1"],
    }  # fmt: skip
    settings = [f"device={device.type}", "threads=1", *JOB_SETTINGS]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out: dict[str, Any] = {"settings": settings}
    try:
        for name, launcher in launchers.items():
            command = [
                *launcher, "-m", "gvmrl", "train",
                "--config", str(ROOT / "configs" / "builtin-grpo-gvm.yaml"),
                "--output-dir", str(work / name),
                *(arg for setting in settings for arg in ("--set", setting)),
            ]  # fmt: skip
            start = time.perf_counter()
            try:
                result = subprocess.run(
                    command, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S
                )
            except subprocess.TimeoutExpired as e:  # a hung collective: keep the other run
                out[name] = {"returncode": None, "error": f"no exit within {e.timeout:.0f} s"}
                continue
            out[name] = {"returncode": result.returncode, "seconds": time.perf_counter() - start}
            if result.returncode != 0:
                out[name]["stderr_tail"] = result.stderr[-3000:]
                continue
            rows = [json.loads(line) for line in (work / name / "metrics.jsonl").open()]
            out[name].update(
                world_size=rows[-1]["world_size"],
                tokens_generated=[r["tokens_generated"] for r in rows if "samples" in r],
                phase_seconds={k: v for k, v in rows[-1].items() if k.startswith("time_")},
            )
        failed = [name for name in launchers if out[name]["returncode"] != 0]
        if failed:
            out["error"] = f"did not exit 0: {', '.join(failed)}"
        else:
            plain, job = (load_file(work / n / "final" / "model.safetensors") for n in launchers)
            out["final_weights_max_abs_difference"] = max(
                (plain[k].float() - job[k].float()).abs().max().item() for k in plain
            )
            out["same_tokens_generated"] = (
                out["plain"]["tokens_generated"] == out["torchrun"]["tokens_generated"]
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="JSON file of figures")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, in seconds")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():  # full sizes on a CPU take hours
        print(
            f"gpu_check: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; "
            "use --smoke for the CPU rehearsal",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    sizes = SMOKE if args.smoke else FULL
    skip = set(filter(None, args.skip.split(",")))
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
    }
    import transformers

    report["transformers"] = transformers.__version__
    parts = {
        "c": ("master_weights", lambda: check_master_weights(args.smoke, device)),
        "a": ("grad_norms", lambda: check_grad_norms(sizes, args.smoke, device)),
        "d": ("job", lambda: check_job(device)),
        "b": ("iteration", lambda: check_iteration(sizes, args.smoke, device)),
    }  # shortest first; the file is rewritten after each, so a run cut short keeps what it got
    started = time.perf_counter()
    failed = False
    for part, (key, check) in parts.items():
        if part in skip:
            continue
        try:
            report[key] = check()
        except Exception as e:  # a failed part must not lose the others' figures
            report[key] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        failed = failed or "error" in report[key]
        report["total_seconds"] = time.perf_counter() - started
        write_json(args.output, report)
    print(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
