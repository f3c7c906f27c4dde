"""Final-answer extraction and equivalence: the verifiable reward of RAFT++/GRPO.

A response is graded in three steps:

1. `extract_answer` pulls the final answer out of the text: the last well-formed `\\boxed{...}`
   (braces balanced), `\\boxed x` or `\\fbox{...}`; without one, the text after the last
   `#### ` (GSM8K style), else after the last "the answer is".
2. A fast path decides pairs where both the prediction and the gold are plain numbers
   (`-12`, `3.50`) without sympy, giving math-verify's verdict: equal values match, different
   integers or numbers more than 1e-6 apart do not (closer decimals go on to step 3). The
   built-in task's answers are all of this kind.
3. Everything else goes to math-verify (fractions, percentages, intervals, sets, tuples,
   matrices, expressions, degrees, text, units stripped), under a timeout.

Reference answers may be strings, numbers or lists (OlympiadBench stores lists):
- a string is LaTeX; unescaped `$` delimiters are dropped (`$69$,$84$` reads as `69,84`);
- an int or a finite float is that number;
- a list of one element is that element;
- a list of several elements is one unordered set answer: the response must give every element
  and no other, in any order (as OlympiadBench multi-answer questions require), which
  math-verify checks by comparing `{e1, e2, ...}` with the comma-separated prediction (being
  a set, repeated elements count once: `["-2", "-2"]` is matched by `-2`).

Timeouts: math-verify 0.9 bounds its own parse and verify calls with `signal.alarm`, which
raises outside the main thread, takes whole seconds, and cannot stop C code. We switch it off
and bound each (prediction, gold) comparison ourselves:
- in a worker process, a `SIGALRM` timer interrupts the Python code of sympy/latex2sympy at the
  deadline; the worker then reports "timeout" and is replaced, and the parent kills and
  replaces any worker that has not answered `KILL_GRACE_S` later (stuck in C code, crashed or
  stopped). Replacing the worker matters: an exception thrown into sympy mid-computation can
  leave its global cache inconsistent, which we saw turn later verdicts wrong;
- in-process on the main thread (`Grader(workers=0)`), the same `SIGALRM` timer; after the
  first interrupt this process's sympy is no longer trusted (clearing its cache did not always
  help, e.g. after an interrupt cut sympy's lazy imports short), so every later comparison of
  the process runs in a worker instead. Each process warms math-verify up once, untimed,
  so lazy imports happen before the first deadline;
- in-process off the main thread, where signals cannot be used, a private one-worker pool.
A timed-out or crashed comparison scores 0 with reason "timeout" or "error"; nothing hangs.
"""

from __future__ import annotations

import contextlib
import decimal
import functools
import logging
import math
import multiprocessing
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from numbers import Integral, Real
from typing import Union

# A reference answer as datasets store it.
Answer = Union[str, int, float, Sequence[Union[str, int, float]]]

# Seconds a worker may overrun its own SIGALRM deadline before the parent kills it.
KILL_GRACE_S = 0.5

# Seconds a new worker may take to import math-verify and report ready.
_WORKER_START_TIMEOUT_S = 60.0

# Set once a math-verify call in this process has been interrupted; from then on comparisons
# run in worker processes (see the module docstring).
_INTERRUPTED_IN_PROCESS = threading.Event()

# Decimal places compared when a number has a fractional part (math-verify's float_rounding).
FLOAT_ROUNDING = 6


@dataclass(frozen=True)
class Grade:
    """The verdict on one response.

    score: 1.0 when the extracted answer is equivalent to the reference, else 0.0.
    pred: the extracted final answer, None when nothing could be extracted.
    reason: "match", "mismatch", "no_answer", "timeout" (the comparison ran past its deadline)
        or "error" (the worker grading it crashed).
    """

    score: float
    pred: str | None
    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Extraction


_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)")
_BRACE = re.compile(r"[{}]")
_HASHES = re.compile(r"####[ \t]*")
_ANSWER_IS = re.compile(r"answer is[:\s]*", re.IGNORECASE)
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def _balanced_group(text: str, open_at: int) -> str | None:
    """Contents of the brace group whose `{` is at `open_at`; None when it never closes."""
    depth = 0
    for brace in _BRACE.finditer(text, open_at):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[open_at + 1 : brace.start()]
    return None


def _boxed_argument(text: str, command_end: int) -> str | None:
    """Argument of a `\\boxed`/`\\fbox` ending at `command_end`: `{...}` or one bare token."""
    rest = text[command_end:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        return _balanced_group(text, command_end + len(rest) - len(stripped))
    if rest[:1].isspace():  # `\boxed 5$`: the token up to whitespace or `$`
        token = re.match(r"[^\s$]*", stripped).group()
        return token or None
    return None  # e.g. `\boxedfoo`: another command that merely starts the same way


def _last_boxed(text: str) -> str | None:
    """The last well-formed, non-empty box; an unclosed box (truncated output) is skipped."""
    for command in reversed(list(_BOX_COMMAND.finditer(text))):
        content = _boxed_argument(text, command.end())
        if content and content.strip():
            return content.strip()
    return None


def _clean_inline(answer: str) -> str | None:
    """An answer written inline in prose: first sentence, `$`/`\\(`/`\\)` delimiters dropped."""
    sentence_end = _SENTENCE_END.search(answer)
    if sentence_end:
        answer = answer[: sentence_end.start()]
    answer = _UNESCAPED_DOLLAR.sub("", answer).replace("\\(", "").replace("\\)", "")
    answer = answer.strip().rstrip(".").strip()
    return answer or None


def _after_last(pattern: re.Pattern[str], text: str) -> str | None:
    """The rest of the line after the last match of `pattern`, cleaned as an inline answer."""
    last = None
    for last in pattern.finditer(text):
        pass
    if last is None:
        return None
    return _clean_inline(text[last.end() :].split("\n", 1)[0])


# Tried in order; the first that finds an answer wins.
_EXTRACTORS = (
    _last_boxed,
    functools.partial(_after_last, _HASHES),
    functools.partial(_after_last, _ANSWER_IS),
)


def extract_answer(response: str) -> str | None:
    """The final answer of a response, or None.

    The last well-formed `\\boxed{...}` (balanced braces; also `\\boxed x` and `\\fbox{...}`);
    without a box, the rest of the line after the last `#### ` (GSM8K), else after the last
    "the answer is" (cut at the end of the sentence, `$` delimiters dropped). Linear time in
    the length of the response, so pathological inputs cannot stall extraction.
    """
    for extractor in _EXTRACTORS:
        answer = extractor(response)
        if answer is not None:
            return answer
    return None


# ---------------------------------------------------------------------------------------------
# Reference answers and the fast path


def _number_latex(value: Real) -> str:
    if isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"reference answer {value!r} is not a finite number")
    if isinstance(value, Integral):
        return str(int(value))
    return format(decimal.Decimal(repr(float(value))), "f")  # 1e-07 -> 0.0000001


def _scalar_latex(value: object) -> str:
    if isinstance(value, str):
        return _UNESCAPED_DOLLAR.sub("", value).strip()
    if isinstance(value, Real):
        return _number_latex(value)
    kind = type(value).__name__
    raise TypeError(f"reference answer element must be a string or a number, not {kind}")


def reference_latex(answer: Answer) -> str:
    """The reference answer as one LaTeX string (see the module docstring for lists).

    Raises TypeError for an unsupported type and ValueError for an empty answer or list, a
    boolean, NaN or infinity.
    """
    if isinstance(answer, (list, tuple)):
        if not answer:
            raise ValueError("reference answer is an empty list")
        latex = ", ".join(_scalar_latex(element) for element in answer)
    else:
        latex = _scalar_latex(answer)
    if not latex:
        raise ValueError("reference answer is empty")
    return latex


_PLAIN_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]+)?")


def _plain_number(latex: str) -> decimal.Decimal | None:
    """The value of `latex` if it is a plain integer or decimal (`$`, spaces, final `.` aside)."""
    text = _UNESCAPED_DOLLAR.sub("", latex).strip().rstrip(".").strip()
    if _PLAIN_NUMBER.fullmatch(text):
        return decimal.Decimal(text)
    return None


def _fast_equivalent(pred: str, gold: str) -> bool | None:
    """math-verify's verdict on two plain numbers, without sympy; None when it needs sympy.

    Equal values match and two different integers do not. math-verify compares numbers with a
    fractional part after rounding both to FLOAT_ROUNDING places, so values more than one unit
    of that place apart never match; values closer than that (a rounding tie, decided by sympy's
    binary floats) are left to math-verify, as is anything that is not a plain number.
    """
    a, b = _plain_number(pred), _plain_number(gold)
    if a is None or b is None:
        return None
    if a == b:
        return True
    if a == a.to_integral_value() and b == b.to_integral_value():
        return False
    if abs(a - b) > decimal.Decimal(1).scaleb(-FLOAT_ROUNDING):
        return False
    return None


# ---------------------------------------------------------------------------------------------
# math-verify under a deadline


class _DeadlineExceeded(BaseException):
    """Raised by our SIGALRM handler. A BaseException, so math-verify's `except Exception`
    blocks cannot swallow it and carry on past the deadline."""


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once that its timeout is off; ours replaces it, so the warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


# Comparisons run once per process before any deadline: sympy imports much lazily on first
# use, which should neither count against the first real comparison nor be cut short by it.
_WARM_UP_PAIRS = (("0.5", "\\frac{1}{2}"), ("2(x+1)", "2x+2"), ("(1,2]", "\\{1, 2\\}"))


@functools.cache
def _math_verify():
    """Import and warm up math-verify once per process (~1 s), its timeout warning filtered."""
    import math_verify

    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropDisabledTimeoutWarning())
    for pred, gold in _WARM_UP_PAIRS:
        math_verify.verify(
            math_verify.parse(f"${gold}$", parsing_timeout=None),
            math_verify.parse(f"${pred}$", parsing_timeout=None),
            timeout_seconds=None,
        )
    return math_verify


def _math_verify_equivalent(pred: str, gold: str) -> bool:
    """math-verify's verdict on `$pred$` against `$gold$`, with its own signal timeouts off."""
    mv = _math_verify()
    gold_parsed = mv.parse(f"${gold}$", parsing_timeout=None)
    pred_parsed = mv.parse(f"${_UNESCAPED_DOLLAR.sub('', pred)}$", parsing_timeout=None)
    return bool(mv.verify(gold_parsed, pred_parsed, timeout_seconds=None))


@contextlib.contextmanager
def _sigalrm_deadline(seconds: float) -> Iterator[None]:
    """Raise _DeadlineExceeded in this (main) thread after `seconds` of wall time.

    Saves and restores any timer already armed (pytest-timeout uses SIGALRM too), re-arming it
    with what is left of its delay. The handler checks `armed`, so an alarm landing while the
    `finally` block runs cannot skip the restoring.
    """
    armed = True

    def on_alarm(signum: int, frame: object) -> None:
        if armed:
            raise _DeadlineExceeded

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


def _compare_within(pred: str, gold: str, timeout: float) -> str:
    """Reason ("match", "mismatch", "timeout") for one pair, on the main thread of its process."""
    _math_verify()  # warm up outside the deadline
    try:
        with _sigalrm_deadline(timeout):
            return "match" if _math_verify_equivalent(pred, gold) else "mismatch"
    except _DeadlineExceeded:
        return "timeout"


def _serve(conn: Connection, timeout: float) -> None:
    """Worker loop: receive (pred, gold), send back its reason; None or a closed pipe ends it.

    After a timeout the worker exits (the parent replaces it), so no state touched by the
    interrupted computation is ever reused.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _math_verify()
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        reason = _compare_within(*task, timeout)
        conn.send(reason)
        if reason == "timeout":
            return


class _WorkerPool:
    """Processes that run math-verify with a per-task deadline, replacing any that hang or die.

    Each worker holds one task at a time, so a task's deadline starts when its worker gets it.
    Workers come from a forkserver that has math-verify imported, so a replacement is a cheap
    fork of a clean process (never of the caller, which may hold torch threads).
    """

    def __init__(self, size: int, timeout: float):
        self._timeout = timeout
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["math_verify", __name__])
        self._workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = [
            self._start_worker() for _ in range(size)
        ]

    def _start_worker(self) -> tuple[multiprocessing.process.BaseProcess, Connection]:
        parent_end, child_end = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child_end, self._timeout), daemon=True)
        process.start()
        child_end.close()
        try:
            if not parent_end.poll(_WORKER_START_TIMEOUT_S):
                raise EOFError
            parent_end.recv()
        except (EOFError, OSError):
            process.kill()
            process.join()
            raise RuntimeError(
                "a grading worker failed to start; a script that grades with workers must guard "
                "its entry point with `if __name__ == '__main__':`, as multiprocessing requires"
            ) from None
        return process, parent_end

    def _replace(self, slot: int) -> None:
        process, conn = self._workers[slot]
        process.kill()
        process.join()
        conn.close()
        self._workers[slot] = self._start_worker()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process, _ in self._workers]

    def compare_many(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        """Reason for each (pred, gold) pair, in order; "timeout"/"error" for killed/crashed."""
        reasons = ["error"] * len(pairs)
        pending = deque(range(len(pairs)))
        idle = list(range(len(self._workers)))
        busy: dict[int, tuple[int, float]] = {}  # slot -> (pair index, kill deadline)
        while pending or busy:
            while pending and idle:
                slot, index = idle.pop(), pending.popleft()
                try:
                    self._workers[slot][1].send(pairs[index])
                except OSError:  # the worker died while idle: replace it and retry the pair
                    self._replace(slot)
                    idle.append(slot)
                    pending.appendleft(index)
                    continue
                busy[slot] = (index, time.monotonic() + self._timeout + KILL_GRACE_S)
            slot_of = {self._workers[slot][1]: slot for slot in busy}
            wait_s = max(0.0, min(deadline for _, deadline in busy.values()) - time.monotonic())
            for conn in wait(list(slot_of), timeout=wait_s):
                slot = slot_of[conn]
                index, _ = busy.pop(slot)
                try:
                    reasons[index] = conn.recv()
                except (EOFError, OSError):  # crashed mid-task (segfault, OOM kill)
                    self._replace(slot)
                if reasons[index] == "timeout":  # the worker exits after an interrupt
                    self._replace(slot)
                idle.append(slot)
            now = time.monotonic()
            for slot, (index, deadline) in list(busy.items()):
                if deadline <= now:  # stuck where SIGALRM cannot reach: kill it
                    del busy[slot]
                    reasons[index] = "timeout"
                    self._replace(slot)
                    idle.append(slot)
        return reasons

    def close(self) -> None:
        for process, conn in self._workers:
            with contextlib.suppress(OSError):
                conn.send(None)
        for process, conn in self._workers:
            process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join()
            conn.close()
        self._workers = []


# ---------------------------------------------------------------------------------------------
# Public grading API


class Grader:
    """Batch grading, reused across calls (the training loop grades every iteration).

    workers: 0 grades in the calling process (math-verify bounded by SIGALRM on the main
        thread; off the main thread, or once an interrupt has left this process's sympy
        untrusted, a private one-worker pool instead);
        N > 0 starts N worker processes (on the first pair that needs math-verify), a worker
        being killed and replaced when a comparison overruns `timeout + KILL_GRACE_S`.
    timeout: seconds allowed for one math-verify comparison (parse of both sides + verify).

    Extraction, the plain-number fast path and de-duplication of identical (pred, gold) pairs
    happen in the calling process; only the remaining unique pairs reach math-verify.
    Use as a context manager, or call `close()`, to stop the workers.
    """

    def __init__(self, workers: int = 0, timeout: float = 5.0):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.workers = workers
        self.timeout = timeout
        self._pool: _WorkerPool | None = None  # started when math-verify is first needed

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (empty when grading in-process)."""
        return [] if self._pool is None else self._pool.pids

    def _can_compare_in_process(self) -> bool:
        return (
            self.workers == 0
            and threading.current_thread() is threading.main_thread()
            and not _INTERRUPTED_IN_PROCESS.is_set()
        )

    def _compare_many(self, pairs: Sequence[tuple[str, str]]) -> list[str]:
        reasons: list[str] = []
        while len(reasons) < len(pairs) and self._can_compare_in_process():
            reasons.append(_compare_within(*pairs[len(reasons)], self.timeout))
            if reasons[-1] == "timeout":
                _INTERRUPTED_IN_PROCESS.set()
        rest = pairs[len(reasons) :]
        if rest and self._pool is None:  # workers == 0 but signals unavailable or untrusted
            self._pool = _WorkerPool(max(self.workers, 1), self.timeout)
        return reasons + (self._pool.compare_many(rest) if rest else [])

    def grade_many(self, responses: Sequence[str], answers: Sequence[Answer]) -> list[Grade]:
        """Grade `responses[i]` against `answers[i]` for every i, in order.

        Raises ValueError if the lengths differ, and TypeError/ValueError (from
        `reference_latex`) for an answer that is not a string, a number or a non-empty list.
        """
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        golds = [reference_latex(answer) for answer in answers]
        preds = [extract_answer(response) for response in responses]
        reasons: list[str | None] = [None] * len(preds)
        slow_pairs: dict[tuple[str, str], list[int]] = {}
        for i, (pred, gold) in enumerate(zip(preds, golds)):
            if pred is None:
                reasons[i] = "no_answer"
                continue
            fast = _fast_equivalent(pred, gold)
            if fast is None:
                slow_pairs.setdefault((pred, gold), []).append(i)
            else:
                reasons[i] = "match" if fast else "mismatch"
        for reason, indices in zip(self._compare_many(list(slow_pairs)), slow_pairs.values()):
            for i in indices:
                reasons[i] = reason
        return [
            Grade(1.0 if reason == "match" else 0.0, pred, reason)
            for pred, reason in zip(preds, reasons)
        ]


def grade(response: str, answer: Answer, *, timeout: float = 5.0) -> Grade:
    """Grade one response in-process (see `Grader` for batches and worker processes)."""
    with Grader(workers=0, timeout=timeout) as grader:
        return grader.grade_many([response], [answer])[0]
