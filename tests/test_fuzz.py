"""Fuzzing the input readers and the config parser: random bytes and random structures give a
result or exit 2 with one line naming the file (and line) or the config key, never a traceback.

Everything runs in process through `gvmrl.cli.main`; no model is loaded (eval's reader is the
prompt loader, called directly; `gvmrl train` gets a stand-in trainer).
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import types
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gvmrl.cli import main
from gvmrl.config import ConfigError, load_config
from gvmrl.data import load_prompts
from gvmrl.io import InputError

FIELDS = ["accept_rate", "grad_norm", "response", "answer", "problem", "id", "prompt_id", "score"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["\\boxed{1}", "1", "0.5", "nan", "Infinity"]),
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
rows = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), json_values, max_size=6)


def _line(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode() + b"\n"


jsonl_bytes = (
    st.binary(max_size=300)
    | st.lists(rows.map(_line), max_size=5).map(b"".join)
    | st.lists(
        st.one_of(rows.map(_line), json_values.map(_line), st.binary(max_size=30)), max_size=5
    ).map(b"".join)
    | st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth + b"\n")
)
fuzz = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


def _assert_result_or_one_line(code: int, err: str, where: str) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        last = err.strip().splitlines()[-1]
        assert last.startswith(where), err


@pytest.mark.parametrize("command", ["allocate", "score", "prepare"])
@fuzz
@given(data=jsonl_bytes)
def test_jsonl_commands_answer_random_input_with_a_result_or_file_line(capsys, command, data):
    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "in.jsonl", str(Path(tmp) / "out.json")
        source.write_bytes(data)
        argv = {
            "allocate": ["allocate", "--stats", str(source), "--budget", "16", "--output", out],
            "score": ["score", "--input", str(source), "--output", out, "--workers", "0"],
            "prepare": ["data", "prepare", "--input", str(source), "--output", out],
        }[command]
        code, err = _run(argv, capsys)
        _assert_result_or_one_line(code, err, str(source))


@fuzz
@given(data=jsonl_bytes, suffix=st.sampled_from([".jsonl", ".json"]))
def test_the_eval_prompt_reader_raises_only_input_errors(data, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / f"in{suffix}"
        source.write_bytes(data)
        try:
            load_prompts(source)
        except InputError as e:
            assert str(e).startswith(str(source)) and "\n" not in str(e)


KEYS = [
    "iterations",
    "seed",
    "gvm.alpha",
    "gvm.beta",
    "gvm.min_size",
    "gvm.max_size",
    "gvm.drop_above",
    "gvm.accept_prior",
    "optim.betas",
    "optim.lr",
    "rollout.batch_size",
    "rollout.top_p",
    "loss.dual_clip",
    "data.overlong",
    "eval",
    "gvm",
]
yaml_values = json_values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
overrides = st.lists(
    st.tuples(st.sampled_from(KEYS) | st.text(max_size=8), yaml_values | st.text(max_size=12)).map(
        lambda kv: f"{kv[0]}={kv[1]}"
    )
    | st.text(max_size=12),
    max_size=4,
)
yaml_documents = (
    st.binary(max_size=200)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values, max_size=5).map(
        lambda d: yaml.safe_dump(d).encode()
    )
    | st.text(max_size=200).map(str.encode)
)


@contextlib.contextmanager
def _stand_in_trainer():
    """`gvmrl.train` replaced by a module whose `train` does nothing: the parser is under test.
    Only that one entry of sys.modules is swapped (restoring all of it would unload torch)."""
    stand_in = types.ModuleType("gvmrl.train")
    stand_in.train = lambda config, output_dir: {}
    real = sys.modules.get("gvmrl.train")
    sys.modules["gvmrl.train"] = stand_in
    try:
        yield
    finally:
        if real is None:
            del sys.modules["gvmrl.train"]
        else:
            sys.modules["gvmrl.train"] = real


@fuzz
@given(document=yaml_documents, sets=overrides)
def test_train_config_parsing_gives_a_config_or_one_line(capsys, document, sets):
    with tempfile.TemporaryDirectory() as tmp, _stand_in_trainer():
        config = Path(tmp) / "c.yaml"
        config.write_bytes(document)
        argv = ["train", "--config", str(config), "--output-dir", str(Path(tmp) / "run")]
        code, err = _run([*argv, *(a for s in sets for a in ("--set", s))], capsys)
        _assert_result_or_one_line(code, err, "")
        if code == 2 and err.startswith("gvmrl train: "):
            assert "\n" not in err.strip()


@fuzz
@given(sets=overrides)
def test_load_config_raises_only_config_errors(sets):
    try:
        config = load_config(None, sets)
    except ConfigError as e:
        assert "\n" not in str(e)
    else:
        assert config.validate() is config
