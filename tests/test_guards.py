"""The non-finite guard: which steps it admits, how it counts skips, when it stops the run."""

from __future__ import annotations

import math

import pytest
import torch

from gvmrl.guards import NonFiniteError, NonFiniteGuard, first_non_finite


def test_finite_steps_are_admitted_and_reset_the_run_of_skips():
    guard = NonFiniteGuard(max_skipped_steps=3)
    assert guard.admit(0.5, 1.0)
    assert not guard.admit(math.nan, 1.0)
    assert not guard.admit(0.5, math.inf)
    assert (guard.skipped, guard.in_a_row) == (2, 2)
    assert guard.admit(torch.tensor(0.1), torch.tensor(2.0))  # tensors, as the trainer has them
    assert (guard.skipped, guard.in_a_row) == (2, 0)


@pytest.mark.parametrize("loss, grad_norm", [(math.nan, 1.0), (1.0, -math.inf), (math.inf, 0.0)])
def test_k_consecutive_skips_stop_with_a_clear_message(loss, grad_norm):
    guard = NonFiniteGuard(max_skipped_steps=2)
    assert not guard.admit(loss, grad_norm)
    with pytest.raises(NonFiniteError, match=r"2 optimizer steps in a row .*max_skipped_steps=2"):
        guard.admit(loss, grad_norm)
    assert guard.skipped == 2


def test_a_resumed_guard_continues_its_count():
    guard = NonFiniteGuard(3, skipped=5, in_a_row=2)
    with pytest.raises(NonFiniteError):
        guard.admit(math.nan, math.nan)


def test_max_skipped_steps_must_be_positive():
    with pytest.raises(ValueError):
        NonFiniteGuard(0)


def test_first_non_finite_names_the_parameter():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert first_non_finite(model) is None
    with torch.no_grad():
        model[0].bias[1] = math.inf
    assert first_non_finite(model) == "0.bias"
    with torch.no_grad():
        model[0].bias[1] = 0.0
        model[1].running_var[0] = math.nan  # buffers count too: they are saved
    assert first_non_finite(model) == "1.running_var"
