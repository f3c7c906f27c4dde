"""fp32 master weights with bf16 compute: what the trainable model is stored in and computed in.

AdamW at the paper's lr 1e-6 moves a weight by about 1e-6 per step, while bf16 keeps 8 bits of
mantissa: a weight of magnitude 0.02 has neighbours 7.8e-5 apart, so a bf16 weight updated in
place rounds back to itself (measured: 1.9% of a 1536x1536 matrix's elements changed
after 10 steps, against 99.99% in fp32). TRL and verl therefore keep fp32 parameters and
optimizer state and run the matmuls in bf16. Here that is `torch.autocast`: parameters stay in
`param_dtype` (the config's `dtype`, float32 by default), forward passes run under
`Precision.autocast()` in `compute_dtype` (`compute_dtype: auto` is bfloat16 on CUDA and the
parameter dtype elsewhere, so CPU runs compute exactly as before).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Precision:
    """Storage and compute dtypes of the trainable model on one device type."""

    param_dtype: torch.dtype
    """Parameters, gradients and optimizer state (the master weights)."""
    compute_dtype: torch.dtype
    """Matmuls of forward and backward passes (autocast when it differs from param_dtype)."""
    device_type: str
    """"cuda" or "cpu": the autocast device."""

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for forward passes (rollouts with the HF engine, pi_old, reference, update,
        gradient norms); a no-op when compute and parameter dtypes agree."""
        if self.compute_dtype == self.param_dtype:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.compute_dtype)

    @property
    def rollout_dtype(self) -> str:
        """The dtype name a separate inference engine (vLLM) should hold its weights in."""
        return str(self.compute_dtype).removeprefix("torch.")


def resolve_precision(dtype: str, compute_dtype: str, device: torch.device | str) -> Precision:
    """The config's `dtype` (parameters; auto: float32) and `compute_dtype` (auto: bfloat16 on
    CUDA, else the parameter dtype) on `device`.

    Raises ValueError for a combination autocast cannot give: a compute dtype wider than the
    parameters (autocast only lowers precision).
    """
    device_type = torch.device(device).type
    for key, name in (("dtype", dtype), ("compute_dtype", compute_dtype)):
        if name != "auto" and name not in DTYPE_NAMES:
            raise ValueError(f"{key}: one of auto, {', '.join(DTYPE_NAMES)}; got {name!r}")
    param = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    if compute_dtype == "auto":
        compute = torch.bfloat16 if device_type == "cuda" and param == torch.float32 else param
    else:
        compute = getattr(torch, compute_dtype)
    if compute != param and param != torch.float32:
        raise ValueError(
            f"compute_dtype: {compute_dtype} with dtype {dtype}: bf16/fp16 parameters compute in "
            "their own dtype; set dtype: float32 for fp32 master weights with low-precision compute"
        )
    return Precision(param, compute, device_type)


def changed_share_after_step(
    model: torch.nn.Module,
    precision: Precision,
    input_ids: torch.Tensor,
    weight: torch.Tensor,
    lr: float = 1e-6,
) -> float:
    """Share of `weight`'s elements one AdamW step at `lr` changes, with the forward of a summed
    next-token log-likelihood of `input_ids` (N, T) under `precision.autocast()`: the check that
    master weights move at the paper's learning rate (tests/test_precision.py,
    scripts/gpu_check.py)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    before = weight.detach().clone()
    with precision.autocast():
        logits = model(input_ids=input_ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    loss = -logp.gather(-1, input_ids[:, 1:, None]).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float((weight.detach() != before).float().mean())
