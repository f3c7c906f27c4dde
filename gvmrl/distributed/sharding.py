"""FSDP2 data parallelism for a Hugging Face causal LM: shard, run its log-prob forward, gather.

Each decoder layer is one FSDP unit and the root holds the rest (embeddings, final norm, output
layer: tied embeddings must share a unit). Parameters stay fp32 (the master weights the optimizer
updates); on GPU the forward and backward run in bf16 with gradients reduced in fp32.

The trainer's forward is `batching.token_logprobs`, which calls the decoder body and the output
layer separately rather than `model.forward`; FSDP only unshards the root's parameters around
registered forward methods, so `shard_model` registers that function as one
(`policy_logprobs(model)` returns it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)

from gvmrl.batching import token_logprobs

LOGPROBS_METHOD = "gvmrl_token_logprobs"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: modules whose class is in `_no_split_modules` (what
    transformers itself keeps whole when splitting a model, e.g. Qwen2DecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found (none of its modules is one of "
            f"_no_split_modules={sorted(names)})"
        )
    return layers


def mixed_precision(compute_dtype: torch.dtype) -> MixedPrecisionPolicy:
    """fp32 throughout, or `compute_dtype` (bf16) compute with fp32 gradient reduction."""
    if compute_dtype == torch.float32:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def shard_model(
    model: torch.nn.Module, mesh: DeviceMesh, *, compute_dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """Apply FSDP2 in place (each decoder layer, then the root) with fp32 master weights.

    Gradients are summed over ranks, not averaged: the trainer's token weights are normalised
    over the whole mini-batch (`losses.token_weights` before its rows are dealt), so the sum is
    the gradient of the global loss. Returns `model`, now an FSDPModule whose parameters are
    DTensor shards.
    """
    model.to(torch.float32)
    policy = mixed_precision(compute_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    setattr(model, LOGPROBS_METHOD, functools.partial(token_logprobs, model))
    register_fsdp_forward_method(model, LOGPROBS_METHOD)
    return model


def policy_logprobs(model: torch.nn.Module) -> Callable[..., torch.Tensor | tuple]:
    """`token_logprobs(model, batch, **options)` as a function of (batch, **options): through
    FSDP's hooks for a sharded model, the plain function otherwise."""
    return getattr(model, LOGPROBS_METHOD, None) or functools.partial(token_logprobs, model)


def full_state_dict(model: torch.nn.Module, *, main_only: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights (a collective: every rank must call it).

    main_only: rank 0 gets them on the CPU and the other ranks an empty dict (to save a
    checkpoint); otherwise every rank gets them on its device (to load a rollout engine).
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=main_only)
    return get_model_state_dict(model, options=options)


def sync_replica(model: torch.nn.Module, replica: torch.nn.Module) -> None:
    """Copy the sharded `model`'s current weights into a plain full copy (a rollout engine's,
    which samples without collectives, so ranks may decode different lengths)."""
    replica.load_state_dict(full_state_dict(model))
