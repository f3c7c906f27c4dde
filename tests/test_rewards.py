"""Stricter training reward for the built-in task: every stated equation must hold."""

from __future__ import annotations

import pytest

from gvmrl.rewards import REWARDS, stated_arithmetic_holds
from gvmrl.verify import Grade


@pytest.mark.parametrize(
    "text, holds",
    [
        ("3+5=8. 8*2=16. 16-4=12. \\boxed{12}", True),
        ("5-3=2. 2*9=19. 19+4=23. \\boxed{23}", False),  # 2*9 is not 19
        ("7-9=-2. \\boxed{-2}", True),
        ("\\boxed{12}", True),  # no equation stated: nothing to contradict
        ("12 + 30 = 42 and 6*7=41", False),
    ],
)
def test_stated_arithmetic(text, holds):
    assert stated_arithmetic_holds(text) is holds


def test_answer_and_arithmetic_reward():
    lucky = "5-3=1. 1*9=10. 10+4=14. \\boxed{14}"  # right final answer reached through 5-3=1
    right = "5-3=2. 2*9=18. 18+4=22. \\boxed{22}"
    strict = REWARDS["answer+arithmetic"]
    assert strict(Grade(1.0, "14"), lucky) == 0.0
    assert strict(Grade(1.0, "22"), right) == 1.0
    assert strict(Grade(0.0, "23"), right) == 0.0
    assert REWARDS["answer"](Grade(1.0, "14"), lucky) == 1.0
