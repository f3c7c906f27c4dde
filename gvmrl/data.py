"""Prompt datasets: load problems with reference answers from files or the built-in task.

Sources (`load_prompts(source)`):
- a `.jsonl` file (one object per line), a `.json` file (a list of objects, or an object holding
  one under "data"/"train"/"rows"), a `.parquet` file, or a directory written by
  `datasets.Dataset.save_to_disk` (a `DatasetDict` directory picks `split`);
- a built-in task spec: `builtin` (the split given by `split`), `builtin:train`, `builtin:test`,
  `builtin-hard:test`, ... (see `gvmrl.builtin.task`);
- the name of an evaluation set shipped with the package (`EVAL_SETS`: math500, amc23, aime24,
  minerva_math, olympiadbench; sources and licenses in gvmrl/evalsets/README.md).

A local file or directory of the same name as a built-in spec or a shipped set takes precedence.

Presets say where problem and answer live in the rows of well-known datasets (`PRESETS`); without
a preset, `problem_field` and `answer_field` name them and the answer is taken as is. An answer is
a string or, for datasets that store several acceptable answers (OlympiadBench), a list of strings;
numbers are written as strings (27.0 -> "27").

Errors name the file, the row (the line of a JSONL file, else the 1-based row index) and the field.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gvmrl.builtin import task
from gvmrl.io import InputError, parse_json, read_jsonl, read_text
from gvmrl.records import Answer, PromptRecord

DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

# ---------------------------------------------------------------- answers


def _answer_text(value: Any) -> Answer | None:
    """Normalise a stored answer: numbers to strings (integral floats without `.0`), lists kept."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (list, tuple)):
        items = [_answer_text(v) for v in value]
        if not items or any(not isinstance(v, str) for v in items):
            return None
        return items
    return None


def _boxed(value: Any) -> Answer | None:
    """The last `\\boxed{}` answer of a worked solution (for a list of solutions, of the first)."""
    from gvmrl.verify import extract_answer

    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return extract_answer(value) if isinstance(value, str) else None


def _after_hashes(value: Any) -> Answer | None:
    """GSM8K: the answer follows `####` at the end of the rationale; thousands commas dropped."""
    if not isinstance(value, str) or "####" not in value:
        return None
    return value.rsplit("####", 1)[1].strip().replace(",", "") or None


@dataclass(frozen=True)
class Preset:
    """Where a dataset keeps its problem and answer.

    Each field list is tried in order; the first field present in a row is used. An answer source
    is (field, how to turn the stored value into the answer).
    """

    problem_fields: tuple[str, ...]
    answer_sources: tuple[tuple[str, Callable[[Any], Answer | None]], ...]
    description: str


PRESETS: dict[str, Preset] = {
    "math": Preset(
        ("problem",),
        (("answer", _answer_text), ("solution", _boxed)),
        "MATH / MATH-500: `problem`; `answer`, else the boxed answer of `solution`",
    ),
    "gsm8k": Preset(
        ("question",), (("answer", _after_hashes),), "GSM8K: `question`; `answer` after ####"
    ),
    "numina": Preset(
        ("problem",),
        (("solution", _boxed),),
        "NuminaMath: `problem`; the boxed answer of `solution`",
    ),
    "olympiadbench": Preset(
        ("problem", "question"),
        (("answer", _answer_text), ("final_answer", _answer_text)),
        "OlympiadBench: `problem`/`question`; list answers `answer`/`final_answer` kept as lists",
    ),
    "minerva": Preset(
        ("problem",),
        (("answer", _boxed), ("solution", _boxed)),
        "Minerva math: `problem`; the boxed answer of the worked `answer`",
    ),
}


# ---------------------------------------------------------------- reading rows


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    data = parse_json(read_text(path), path, None)
    if isinstance(data, dict):
        data = next(
            (data[k] for k in ("data", "train", "rows") if isinstance(data.get(k), list)), None
        )
    if not isinstance(data, list):
        raise InputError(path, None, "expected a list of objects (or an object with a 'data' list)")
    for row_no, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise InputError(path, row_no, "expected a JSON object")
        yield row_no, row


def _parquet_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # ArrowIOError / ArrowInvalid
        raise InputError(path, None, f"cannot read parquet: {e}") from None
    yield from enumerate(table.to_pylist(), start=1)


def _dataset_dir_rows(path: Path, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise InputError(path, None, f"not a `datasets` save_to_disk directory: {e}") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise InputError(path, None, f"split {split!r} not found; available: {sorted(data)}")
        data = data[split]
    yield from enumerate(data, start=1)


_FILE_READERS: dict[str, Callable[[Path], Iterator[tuple[int, dict[str, Any]]]]] = {
    ".jsonl": read_jsonl,
    ".json": _json_rows,
    ".parquet": _parquet_rows,
}


def _rows(path: Path, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
    if path.is_dir():
        return _dataset_dir_rows(path, split)
    if not path.exists():
        raise InputError(path, None, "file not found")
    reader = _FILE_READERS.get(path.suffix.lower())
    if reader is None:
        raise InputError(
            path,
            None,
            f"unknown file type {path.suffix!r}; expected one of {sorted(_FILE_READERS)}",
        )
    return reader(path)


# ---------------------------------------------------------------- records


def _row_id(row: dict[str, Any]) -> str | None:
    for key in ("id", "unique_id", "idx"):
        if row.get(key) is not None:
            return str(row[key])
    return None


def _unique_ids(path: Path, ids: list[str | None], row_numbers: list[int]) -> list[str]:
    """The rows' own ids; a row without one gets its position (`000003`). An id that repeats
    is an InputError naming both rows: renumbering would silently break the link between
    results and the user's ids."""
    first_row: dict[str, int] = {}
    unique = []
    for position, (own, row_no) in enumerate(zip(ids, row_numbers, strict=True)):
        record_id = own if own is not None else f"{position:06d}"
        if record_id in first_row:
            given = "" if own is not None else " (its position: the row has no id)"
            earlier = first_row[record_id]
            raise InputError(
                path, row_no, f"duplicate id {record_id!r}{given}, first used by row {earlier}"
            )
        first_row[record_id] = row_no
        unique.append(record_id)
    return unique


@dataclass(frozen=True)
class LoadedPrompts:
    """Records read from a source, plus the rows dropped for lacking an extractable answer."""

    records: list[PromptRecord]
    dropped_rows: list[int]
    """Row numbers (lines for JSONL) whose answer could not be extracted."""


EVAL_SET_DIR = Path(__file__).parent / "evalsets"
EVAL_SETS: dict[str, str] = {
    "math500": "MATH-500: 500 problems of the MATH test split (Lightman et al., 2023)",
    "amc23": "AMC 2023: 40 problems of the AMC 12A/12B 2023 contests",
    "aime24": "AIME 2024: the 30 problems of AIME 2024 I and II",
    "minerva_math": "Minerva Math (OCWCourses): 272 MIT OpenCourseWare STEM problems",
    "olympiadbench": "OlympiadBench: 675 open-ended, text-only, English math competition problems",
}
"""Evaluation sets shipped as package data, by name. Each is stored as `{id, problem, answer}`
JSONL (answers already extracted, ids those of the source), so presets and field names do not
apply to them."""


def eval_set_path(source: str | Path) -> Path | None:
    """The shipped file of a named evaluation set, or None when `source` names none."""
    if isinstance(source, str) and source in EVAL_SETS and not Path(source).exists():
        return EVAL_SET_DIR / f"{source}.jsonl"
    return None


_BUILTIN_SPEC = re.compile(r"builtin(-[a-z]+)?(:[a-z]+)?")


def _is_builtin(source: str | Path) -> bool:
    return (
        isinstance(source, str)
        and _BUILTIN_SPEC.fullmatch(source) is not None
        and not Path(source).exists()
    )


def _builtin(spec: str, split: str) -> list[PromptRecord]:
    """`builtin[-DIFFICULTY][:SPLIT]` -> the records of that built-in split."""
    name, _, split_part = spec.partition(":")
    difficulty = name.partition("-")[2] or "default"
    split = split_part or split
    if difficulty not in task.DIFFICULTIES or split not in task.SPLIT_SIZES:
        raise InputError(
            spec,
            None,
            f"unknown built-in task; use builtin[-DIFFICULTY][:SPLIT], DIFFICULTY in "
            f"{sorted(task.DIFFICULTIES)}, SPLIT in {sorted(task.SPLIT_SIZES)}",
        )
    return task.builtin_split(difficulty, split)


def read_prompts(
    source: str | Path,
    *,
    preset: str | None = None,
    problem_field: str = "problem",
    answer_field: str = "answer",
    limit: int | None = None,
    split: str = "train",
    drop_unanswered: bool = False,
) -> LoadedPrompts:
    """Read prompt records; rows without an extractable answer raise or, if asked, are dropped.

    With a preset, its fields are used and `problem_field`/`answer_field` are ignored; a shipped
    evaluation set ignores all three. `limit` keeps the first `limit` records (after dropping).
    """
    if _is_builtin(source):
        records = _builtin(str(source), split)
        return LoadedPrompts(records[:limit] if limit is not None else records, [])
    shipped = eval_set_path(source)
    if shipped is not None:
        source, preset, problem_field, answer_field = shipped, None, "problem", "answer"
    if preset is not None and preset not in PRESETS:
        raise InputError(source, None, f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = (
        PRESETS[preset]
        if preset
        else Preset((problem_field,), ((answer_field, _answer_text),), "fields")
    )
    path = Path(source)
    ids, row_numbers, problems, answers, dropped = [], [], [], [], []
    for row_no, row in _rows(path, split):
        if limit is not None and len(problems) >= limit:
            break
        problem_key = next((k for k in spec.problem_fields if k in row), spec.problem_fields[0])
        problem = row.get(problem_key)
        if not isinstance(problem, str) or not problem.strip():
            state = "missing" if problem_key not in row else "not a non-empty string"
            raise InputError(path, row_no, f"field {problem_key!r} {state}")
        present = [(k, convert) for k, convert in spec.answer_sources if k in row]
        if not present:
            raise InputError(path, row_no, f"field {spec.answer_sources[0][0]!r} missing")
        answer = next(
            (a for a in (convert(row[k]) for k, convert in present) if a is not None), None
        )
        if answer is None:
            if drop_unanswered:
                dropped.append(row_no)
                continue
            raise InputError(path, row_no, f"field {present[0][0]!r}: no answer could be extracted")
        ids.append(_row_id(row))
        row_numbers.append(row_no)
        problems.append(problem)
        answers.append(answer)
    records = [
        PromptRecord(i, p, a)
        for i, p, a in zip(_unique_ids(path, ids, row_numbers), problems, answers, strict=True)
    ]
    return LoadedPrompts(records, dropped)


def load_prompts(
    source: str | Path,
    *,
    preset: str | None = None,
    problem_field: str = "problem",
    answer_field: str = "answer",
    limit: int | None = None,
    split: str = "train",
) -> list[PromptRecord]:
    """Prompt records from a file, a `datasets` directory, a built-in spec or a shipped set's name.

    A row whose answer cannot be extracted raises `InputError` naming file, row and field; use
    `read_prompts(..., drop_unanswered=True)` (or `gvmrl data prepare`) to drop such rows.
    """
    return read_prompts(
        source,
        preset=preset,
        problem_field=problem_field,
        answer_field=answer_field,
        limit=limit,
        split=split,
    ).records


def format_prompt(
    tokenizer: Any, problem: str, instruction: str | None = DEFAULT_INSTRUCTION
) -> str:
    """The generation prompt for one problem: `problem + " " + instruction` as the user turn.

    Rendered by the tokenizer's chat template with `add_generation_prompt=True` (as the GVM
    reference's MATH preprocessing does). `instruction` None or "" gives the problem alone: the
    built-in char-level model uses that, since the 70-character instruction would double its
    sequence length. A tokenizer without a chat template gets the plain text followed by a newline.
    """
    content = f"{problem} {instruction}" if instruction else problem
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content + "\n"
