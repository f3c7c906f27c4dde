"""Per-prompt statistics carried across visits, so that a recurring prompt needs no pre-samples.

When training runs several epochs over a fixed prompt set, every prompt's earlier visits already
tell how often it is solved and how large its accepted gradients are. `PromptHistory` keeps, per
prompt id (`PromptRecord.id`, a string, or any int):

- exponentially averaged sums across visits (weight `decay` on the past, applied once per visit):

      A_i <- decay * A_i + accepted          S_i <- decay * S_i + samples
      N_i <- decay * N_i + grad_norm_sum     C_i <- decay * C_i + grad_norm_count

  so decay = 1 pools every visit, decay = 0 keeps only the last one; a visit with more samples
  weighs more, as it should for a rate;
- p_i = (A_i + a) / (S_i + a + b): the accept rate, smoothed by a Beta(a, b) prior (the
  posterior mean; a = b = 0 is the plain estimate of GVM, arXiv 2505.02391, Alg. 1);
- G_i = N_i / C_i: the mean gradient norm of the accepted samples whose norm was measured;
- the number of samples ever seen (undecayed), for rules that trust p_i only after enough
  samples (Knapsack-RL waits for 8, arXiv 2509.25849);
- GRESO's zero-variance streaks (arXiv 2506.02177, Sec. 4): how many of the latest consecutive
  visits were all accepted, and how many all rejected.

Unseen prompts get a prior: p = `unseen_accept_rate`, and G = the median G_i of the seen prompts
of the same query (1.0 if none has one: the GVM weights are scale-free in G); the returned
`seen` mask lets an allocator draw pre-samples for them instead. The state is plain lists (JSON-
ready, and loadable with `torch.load(weights_only=True)`) and round-trips exactly (a float
survives JSON through its shortest repr), so a resumed run allocates as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

_FLOAT_FIELDS = ("accepted", "samples", "grad_norm_sum", "grad_norm_count")
_INT_FIELDS = ("samples_seen", "visits", "all_accepted_streak", "all_rejected_streak")


class PromptHistory:
    """Per-prompt accept and gradient-norm statistics, exponentially averaged across visits.

    Args:
        decay: weight of the past per visit, in [0, 1] (1 pools all visits, 0 keeps the last).
        accept_prior: (a, b) of the Beta prior smoothing p_i, both >= 0.
        unseen_accept_rate: p given to a prompt never seen (or seen with no samples), in [0, 1].
    """

    def __init__(
        self,
        decay: float = 1.0,
        accept_prior: tuple[float, float] = (0.0, 0.0),
        unseen_accept_rate: float = 0.5,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay: must be in [0, 1], got {decay}")
        a, b = accept_prior
        if not (a >= 0 and b >= 0 and np.isfinite(a) and np.isfinite(b)):
            raise ValueError(
                f"accept_prior: both entries must be finite and >= 0, got {accept_prior}"
            )
        if not 0.0 <= unseen_accept_rate <= 1.0:
            raise ValueError(f"unseen_accept_rate: must be in [0, 1], got {unseen_accept_rate}")
        self.decay = float(decay)
        self.accept_prior = (float(a), float(b))
        self.unseen_accept_rate = float(unseen_accept_rate)
        self._row: dict[
            Hashable, int
        ] = {}  # prompt id -> row in the arrays below (first seen first)
        self._ids: list[Hashable] = []
        self._float = {name: np.zeros(0, dtype=np.float64) for name in _FLOAT_FIELDS}
        self._int = {name: np.zeros(0, dtype=np.int64) for name in _INT_FIELDS}

    def __len__(self) -> int:
        return len(self._row)

    def update(
        self,
        prompt_ids: Sequence[Hashable],
        accepted,
        samples,
        grad_norm_sum,
        grad_norm_count,
    ) -> None:
        """Record one visit of each prompt.

        Args:
            prompt_ids: (B,) distinct ids (strings or ints).
            accepted: (B,) accepted (reward 1) samples of this visit, 0 <= accepted <= samples.
            samples: (B,) samples generated this visit (pre-samples and main samples alike);
                a prompt with 0 samples was not visited and is left unchanged.
            grad_norm_sum: (B,) sum of the gradient norms measured on accepted samples (>= 0).
            grad_norm_count: (B,) how many accepted samples those norms came from (<= accepted).
        """
        ids = _as_ids(prompt_ids, unique=True)
        acc = _as_array(accepted, "accepted", len(ids))
        n = _as_array(samples, "samples", len(ids))
        g_sum = _as_array(grad_norm_sum, "grad_norm_sum", len(ids))
        g_count = _as_array(grad_norm_count, "grad_norm_count", len(ids))
        for name, values in (("samples", n), ("accepted", acc)):
            if np.any(values != np.round(values)):
                bad = int(np.flatnonzero(values != np.round(values))[0])
                raise ValueError(f"{name}[{bad}] = {values[bad]}: must be a whole number")
        bad = np.flatnonzero(acc > n)
        if bad.size:
            raise ValueError(f"accepted[{bad[0]}] = {acc[bad[0]]}: exceeds samples = {n[bad[0]]}")
        bad = np.flatnonzero(g_count > acc)
        if bad.size:
            raise ValueError(
                f"grad_norm_count[{bad[0]}] = {g_count[bad[0]]}: exceeds accepted = {acc[bad[0]]}"
            )
        visited = n > 0
        rows = self._rows([pid for pid, v in zip(ids, visited) if v], create=True)
        acc, n, g_sum, g_count = acc[visited], n[visited], g_sum[visited], g_count[visited]
        for name, value in zip(_FLOAT_FIELDS, (acc, n, g_sum, g_count)):
            self._float[name][rows] = self.decay * self._float[name][rows] + value
        self._int["samples_seen"][rows] += n.astype(np.int64)
        self._int["visits"][rows] += 1
        for name, zero_variance in (
            ("all_accepted_streak", acc == n),
            ("all_rejected_streak", acc == 0),
        ):
            streak = self._int[name]
            streak[rows] = np.where(zero_variance, streak[rows] + 1, 0)

    def estimates(self, prompt_ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(p, G, seen) for each prompt id.

        Returns:
            p: (B,) float64 Beta-smoothed accept rate; `unseen_accept_rate` where not seen.
            G: (B,) float64 mean gradient norm of accepted samples; where unknown (not seen, or
                no accepted sample with a measured norm yet) the median of the known G_i among
                these prompts, or 1.0 if none is known.
            seen: (B,) bool, True where the prompt has at least one recorded sample.
        """
        rows = self._rows(_as_ids(prompt_ids), create=False)
        seen = rows >= 0
        a, b = self.accept_prior
        p = np.full(rows.size, self.unseen_accept_rate, dtype=np.float64)
        known_rows = rows[seen]
        p[seen] = (self._float["accepted"][known_rows] + a) / (
            self._float["samples"][known_rows] + a + b
        )
        g = np.full(rows.size, np.nan, dtype=np.float64)
        count = np.zeros(rows.size, dtype=np.float64)
        count[seen] = self._float["grad_norm_count"][known_rows]
        has_norm = count > 0
        g[has_norm] = self._float["grad_norm_sum"][rows[has_norm]] / count[has_norm]
        g[~has_norm] = float(np.median(g[has_norm])) if has_norm.any() else 1.0
        return p, g, seen

    def samples_seen(self, prompt_ids) -> np.ndarray:
        """(B,) int64 samples ever recorded for each prompt (undecayed; 0 if unseen)."""
        return self._gather_int("samples_seen", prompt_ids)

    def zero_variance_streaks(self, prompt_ids) -> tuple[np.ndarray, np.ndarray]:
        """(all-accepted streak, all-rejected streak), each (B,) int64: the number of latest
        consecutive visits in which every sample was accepted / rejected (0 if unseen)."""
        return (
            self._gather_int("all_accepted_streak", prompt_ids),
            self._gather_int("all_rejected_streak", prompt_ids),
        )

    def state_dict(self) -> dict[str, list[Any]]:
        """Plain lists, one entry per prompt in first-seen order."""
        state: dict[str, list[Any]] = {"prompt_ids": list(self._ids)}
        for name, values in {**self._float, **self._int}.items():
            state[name] = values.tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the statistics with those of `state_dict()`; the options stay as constructed."""
        expected = {"prompt_ids", *_FLOAT_FIELDS, *_INT_FIELDS}
        if set(state) != expected:
            raise ValueError(
                f"PromptHistory state: expected keys {sorted(expected)}, got {sorted(state)}"
            )
        ids = list(state["prompt_ids"])
        for name in expected - {"prompt_ids"}:
            if len(state[name]) != len(ids):
                raise ValueError(f"PromptHistory state: {name} has {len(state[name])} entries")
        row = {pid: k for k, pid in enumerate(ids)}
        if len(row) != len(ids):
            raise ValueError("PromptHistory state: prompt_ids repeat")
        self._ids, self._row = ids, row
        self._float = {name: np.array(state[name], dtype=np.float64) for name in _FLOAT_FIELDS}
        self._int = {name: np.array(state[name], dtype=np.int64) for name in _INT_FIELDS}

    def _gather_int(self, name: str, prompt_ids) -> np.ndarray:
        rows = self._rows(_as_ids(prompt_ids), create=False)
        out = np.zeros(rows.size, dtype=np.int64)
        out[rows >= 0] = self._int[name][rows[rows >= 0]]
        return out

    def _rows(self, ids: list[Hashable], create: bool) -> np.ndarray:
        """Row of each id; -1 for an unknown id unless `create`, which appends zeroed rows."""
        if create:
            new = [pid for pid in ids if pid not in self._row]
            if new:
                self._row.update({pid: len(self._ids) + k for k, pid in enumerate(new)})
                self._ids.extend(new)
                for store in (self._float, self._int):
                    for name, values in store.items():
                        store[name] = np.concatenate([values, np.zeros(len(new), values.dtype)])
        return np.array([self._row.get(pid, -1) for pid in ids], dtype=np.int64)


def _as_ids(prompt_ids, unique: bool = False) -> list[Hashable]:
    """Ids as plain Python strings or ints (numpy scalars unwrapped, so that 3 and np.int64(3)
    name the same prompt and the state stays JSON-ready)."""
    ids = [pid.item() if isinstance(pid, np.generic) else pid for pid in prompt_ids]
    for pid in ids:
        if isinstance(pid, bool) or not isinstance(pid, (str, int)):
            raise ValueError(f"prompt_ids: must be strings or integers, got {pid!r}")
    if unique and len(set(ids)) != len(ids):
        raise ValueError("prompt_ids: an update must not repeat a prompt id")
    return ids


def _as_array(values, name: str, size: int) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (size,):
        raise ValueError(f"{name}: expected shape ({size},), got {array.shape}")
    bad = np.flatnonzero(~(np.isfinite(array) & (array >= 0)))
    if bad.size:
        raise ValueError(f"{name}[{bad[0]}] = {array[bad[0]]}: must be finite and >= 0")
    return array
