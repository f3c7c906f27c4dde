"""Evaluation sets ship with the package and load by name; every config's data resolves."""

from __future__ import annotations

from pathlib import Path

import pytest

from gvmrl.config import load_config
from gvmrl.data import EVAL_SET_DIR, EVAL_SETS, load_prompts
from gvmrl.io import InputError
from gvmrl.verify import grade

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Prompt counts of the published sets (OlympiadBench: its OE_TO_maths_en_COMP subset).
EXPECTED_SIZES = {
    "math500": 500,
    "amc23": 40,
    "aime24": 30,
    "minerva_math": 272,
    "olympiadbench": 675,
}
# The one data source a config may name without it shipping: the paper's training prompts, a file
# the user prepares once from NuminaMath-CoT as the config's header explains.
USER_PREPARED = ("train_data", "data/numina.jsonl")


def _boxed(answer: str | list[str]) -> str:
    """A response whose final answer is the reference itself (a list as one comma-separated set)."""
    text = ", ".join(answer) if isinstance(answer, list) else answer
    return f"The final answer is \\boxed{{{text}}}."


def test_every_named_set_ships_with_a_readme_naming_its_source_and_license():
    assert set(EVAL_SETS) == set(EXPECTED_SIZES)
    shipped = {p.name for p in EVAL_SET_DIR.iterdir()}
    assert shipped == {f"{name}.jsonl" for name in EXPECTED_SIZES} | {"README.md"}
    readme = (EVAL_SET_DIR / "README.md").read_text()
    for name in EXPECTED_SIZES:
        section = readme.split(f"`{name}`", 1)[1].split("\n## ", 1)[0]
        assert "Source:" in section and "License:" in section, name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"evalsets/*.jsonl"' in pyproject and '"evalsets/README.md"' in pyproject


@pytest.mark.parametrize("name", EXPECTED_SIZES)
def test_shipped_set_loads_by_name_with_unique_ids_and_answers(name):
    records = load_prompts(name)
    assert len(records) == EXPECTED_SIZES[name]
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.problem.strip()
        answers = r.answer if isinstance(r.answer, list) else [r.answer]
        assert answers and all(isinstance(a, str) and a.strip() for a in answers), r.id


def test_shipped_sets_keep_the_sources_ids_and_final_answers():
    math500 = load_prompts("math500")
    assert math500[0].id == "test/precalculus/807.json"
    assert math500[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert load_prompts("amc23")[0].answer == "27"  # the source stores the float 27.0
    assert [r.id for r in load_prompts("aime24")] == [str(i) for i in range(60, 90)]
    # Minerva's source answer is a worked solution ending in \boxed{1.6} \mathrm{~cm}.
    assert load_prompts("minerva_math")[0].answer == "1.6"
    olympiad = load_prompts("olympiadbench")
    assert olympiad[0].id == "1606" and olympiad[0].answer == ["2"]


def test_presets_do_not_apply_and_a_local_path_of_the_same_name_wins(tmp_path, monkeypatch):
    assert load_prompts("minerva_math", preset="minerva") == load_prompts("minerva_math")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "math500").mkdir()
    with pytest.raises(InputError, match="save_to_disk"):
        load_prompts("math500")


@pytest.mark.parametrize("name", EXPECTED_SIZES)
def test_grader_accepts_each_reference_answer_boxed_and_rejects_a_wrong_one(name):
    records = load_prompts(name)
    sample = records[:: max(1, len(records) // 10)]
    for r in sample:
        assert grade(_boxed(r.answer), r.answer).score == 1.0, (name, r.id, r.answer)
    wrong = [grade("The final answer is \\boxed{-98765}.", r.answer).score for r in sample[:3]]
    assert wrong == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_from_the_repo_and_its_data_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)
    # Whether the vllm extra is installed is checked when a run starts (`gvmrl train`), not here:
    # the GPU presets must load on a CPU-only clone too.
    config = load_config(path, check_environment=False)
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    fields = dict(
        preset=config.data.preset,
        problem_field=config.data.problem_field,
        answer_field=config.data.answer_field,
    )
    for key, split in (("train_data", "train"), ("eval_data", "test")):
        source = getattr(config, key)
        if source is None:
            continue
        if source not in EVAL_SETS and not source.startswith("builtin"):
            assert (REPO / source).resolve().is_relative_to(REPO), f"{key} leaves the repo"
        if (key, source) == USER_PREPARED:
            assert not (REPO / source).exists() or load_prompts(source, limit=1, **fields)
            prepare = f"gvmrl data prepare --preset numina --input numina-cot --output {source}"
            assert prepare in header
            assert "AI-MO/NuminaMath-CoT" in header
            continue
        assert load_prompts(source, limit=1, split=split, **fields), f"{key}: {source}"
