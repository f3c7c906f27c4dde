"""Benchmark: batched exact per-sample gradient norms against the reference's one-backward loop.

For each model (the built-in ~1M Qwen2 and a random ~100M Qwen2-style config) and batch size,
times on the same random sequences (prompt + response tokens):

* `forward`: one ordinary forward pass, `model(input_ids).logits`, over the batch;
* `naive`: the GVM reference's method, one forward and one `autograd.grad` per sample on
  L_b = -sum_t log pi over the response, w.r.t. the embedding matrix;
* `batched/<group>`: `gvmrl.estimation.per_sample_grad_norms` for each parameter group;

and prints time ratios (batched / forward, naive / batched). On CPU a batched pass costs as many
flops as the loop (one 256-token sequence already fills the cores), so there the per-sample cost
is what is measured: `--rows` times the first rows of the batch and scales to the batch (the
JSON says so under `rows_timed`). On CUDA every row is timed, in bfloat16, with device syncs.

    .venv/bin/python bench/grad_norms.py                # default, under ~5 min on 2 CPU cores
    .venv/bin/python bench/grad_norms.py --quick        # smoke run, seconds
    .venv/bin/python bench/grad_norms.py --device cuda  # GPU: bf16, all rows
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gvmrl.estimation import per_sample_grad_norms
from gvmrl.io import write_json

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class ModelSpec:
    """A random model to time and how many batch rows to time on CPU (None = all)."""

    name: str
    build: Callable[[], torch.nn.Module]
    cpu_rows: int | None
    repeats: int


def builtin_model() -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    from gvmrl.builtin.model import builtin_model_config, builtin_tokenizer

    return Qwen2ForCausalLM(builtin_model_config(builtin_tokenizer()))


def qwen2_100m() -> torch.nn.Module:
    """~101M parameters, untied like Qwen2-7B so that `lm_head` is its own group; the output layer
    is ~25% of the forward flops, about Qwen2.5-0.5B's share."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32000,
        hidden_size=640,
        intermediate_size=1728,
        num_hidden_layers=14,
        num_attention_heads=10,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


MODELS = {
    "builtin": ModelSpec("builtin", builtin_model, cpu_rows=None, repeats=2),
    "qwen2-100m": ModelSpec("qwen2-100m", qwen2_100m, cpu_rows=4, repeats=1),
}
GROUPS = ("embed_tokens", "lm_head")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


def best_time(
    method: Method, inputs: tuple[torch.Tensor, ...], device: torch.device, repeats: int
) -> tuple[float, torch.Tensor | None]:
    """Minimum wall time over `repeats` runs (the least disturbed one), and the method's result.

    A warm-up on the first row alone pays one-time costs (allocator, kernel selection) cheaply.
    """
    method(*(x[:1] for x in inputs))
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = method(*inputs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times), result


def forward_pass(model: torch.nn.Module) -> Method:
    def run(input_ids, attention_mask, response_mask) -> None:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask)

    return run


def naive_norms(model: torch.nn.Module, response_start: int) -> Method:
    """The reference's loop: per sample a forward, -sum log pi over the response, autograd.grad
    w.r.t. the embedding matrix (all other parameters frozen, as the reference does)."""
    embedding = model.get_input_embeddings().weight

    def run(input_ids, attention_mask, response_mask) -> torch.Tensor:
        norms = []
        for row in input_ids:
            logits = model(input_ids=row[None]).logits[0, response_start - 1 : -1].float()
            loss = -torch.log_softmax(logits, dim=-1).gather(-1, row[response_start:, None]).sum()
            (grad,) = torch.autograd.grad(loss, [embedding])
            norms.append(grad.float().norm())
        return torch.stack(norms)

    return run


def batched_norms(model: torch.nn.Module, group: str, micro_batch_size: int | None) -> Method:
    def run(input_ids, attention_mask, response_mask) -> torch.Tensor:
        return per_sample_grad_norms(
            model, input_ids, attention_mask, response_mask, group, micro_batch_size
        )

    return run


def bench_model(
    spec: ModelSpec, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> list[dict]:
    torch.manual_seed(0)
    model = spec.build().to(device=device, dtype=dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    for p in model.parameters():  # the reference freezes everything outside the group
        p.requires_grad_(p is embedding)
    methods = {"forward": forward_pass(model), "naive": naive_norms(model, args.prompt_length)}
    for group in GROUPS:
        methods[f"batched/{group}"] = batched_norms(model, group, args.micro_batch_size)
    length = args.prompt_length + args.response_length
    results = []
    for batch_size in args.batch_sizes:
        on_cpu_subset = device.type != "cuda" and spec.cpu_rows is not None
        rows = min(spec.cpu_rows, batch_size) if on_cpu_subset else batch_size
        generator = torch.Generator().manual_seed(batch_size)
        input_ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=generator)
        response_mask = torch.zeros((rows, length))
        response_mask[:, args.prompt_length :] = 1.0
        inputs = (
            input_ids.to(device),
            torch.ones_like(input_ids).to(device),
            response_mask.to(device),
        )
        times, outputs = {}, {}
        for name, method in methods.items():
            seconds, outputs[name] = best_time(method, inputs, device, args.repeats or spec.repeats)
            times[name] = seconds * batch_size / rows  # CPU cost is linear in rows
        # the two methods must agree, or the timing compares different things
        naive = outputs["naive"]
        max_relative_difference = float(
            ((outputs["batched/embed_tokens"].float() - naive) / naive).abs().max()
        )
        batched = [name for name in times if name.startswith("batched")]
        ratios = {f"{name}/forward": times[name] / times["forward"] for name in batched}
        ratios |= {f"naive/{name}": times["naive"] / times[name] for name in batched}
        results.append(
            {
                "model": spec.name,
                "parameters": num_params,
                "tied_embeddings": bool(model.config.tie_word_embeddings),
                "batch_size": batch_size,
                "rows_timed": rows,
                "sequence_length": length,
                "response_length": args.response_length,
                "seconds": times,
                "ratios": ratios,
                "max_relative_difference_embed_tokens": max_relative_difference,
            }
        )
        print(
            f"{spec.name} ({num_params / 1e6:.1f}M) batch {batch_size} (rows timed {rows}): "
            + "  ".join(f"{k} {v:.3f}s" for k, v in times.items())
            + "\n    " + "  ".join(f"{k} {v:.2f}" for k, v in ratios.items())
            + f"  max rel diff {max_relative_difference:.1e}",
            flush=True,
        )  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), help=f"comma-separated subset of {sorted(MODELS)}"
    )
    parser.add_argument("--batch-sizes", default="32,64", help="comma-separated batch sizes")
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument(
        "--micro-batch-size", type=int, default=None, help="rows per batched pass (default all)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default per model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; 1 by default: on a shared CPU, spinning OpenMP threads of an "
        "oversubscribed pool made a 2-thread run up to 30x slower",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: builtin only, batch 2, short sequences"
    )
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "grad_norms.json"))
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    if args.quick:
        args.models, args.batch_sizes, args.repeats = "builtin", [2], 1
        args.prompt_length, args.response_length = 8, 24
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results = []
    for name in args.models.split(","):
        results.extend(bench_model(MODELS[name], args, device, dtype))
    report = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "note": "best of repeats; CPU timings on a shared machine vary by up to 2x",
        "models": {
            name: asdict(MODELS[name]) | {"build": MODELS[name].build.__name__}
            for name in args.models.split(",")
        },
        "results": results,
    }
    write_json(args.output, report)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
