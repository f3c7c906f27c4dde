"""The further allocation rules behind the allocator interface: hand cases with a stand-in
trainer, then each rule through the real trainer (tiny built-in runs): every generated sample
counted, a batch the rule cannot fill, exact resume of per-prompt history."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gvmrl.algorithms import ALGORITHMS, GroupBaseline
from gvmrl.allocators import AllocationContext, make_allocator
from gvmrl.config import ConfigError, LossConfig, load_config
from gvmrl.records import PromptRecord, Rollouts
from gvmrl.rewards import REWARDS
from gvmrl.rollout import Sample
from gvmrl.run_setup import PromptStream
from gvmrl.tracking import read_metrics
from gvmrl.train import Trainer


def prompts(*ids: str) -> list[PromptRecord]:
    return [PromptRecord(i, f"problem {i}", "1") for i in ids]


class StandIn:
    """A trainer stand-in: prompt `id` is graded by the cycle `verdicts[id]` (continued across
    requests), every response of it has `norms[id]` tokens (its gradient norm here), and
    further prompts come from `pool` in order."""

    def __init__(self, verdicts, norms=None, pool=()):
        self.verdicts, self.norms, self.pool = verdicts, norms or {}, list(pool)
        self.drawn: dict[str, int] = defaultdict(int)
        self.requests, self.lines = [], []

    def sample(self, batch, sizes, round=0):
        self.requests.append(([r.id for r in batch], [int(n) for n in sizes], round))
        samples, scores, group = [], [], []
        for i, (record, n) in enumerate(zip(batch, sizes)):
            cycle = self.verdicts[record.id]
            for _ in range(int(n)):
                length = self.norms.get(record.id, 1)
                samples.append(Sample(i, [1], [2] * length, record.id, [0.0] * length, "stop"))
                scores.append(float(cycle[self.drawn[record.id] % len(cycle)]))
                group.append(i)
                self.drawn[record.id] += 1
        return Rollouts(samples, np.array(scores), np.array(group, dtype=np.int64))

    def grad_norms(self, samples, params, micro_batch_size):
        return np.array([float(len(s.response_ids)) for s in samples])

    @contextlib.contextmanager
    def timer(self, phase):
        yield

    def more_prompts(self, count, round, exclude):
        return [r for r in self.pool if r.id not in exclude][:count]

    def context(self):
        return AllocationContext(
            self.sample,
            self.grad_norms,
            self.timer,
            self.lines.append,
            more_prompts=self.more_prompts,
            train_set_size=len(self.pool),
        )

    @property
    def generated(self) -> int:
        return sum(sum(sizes) for _, sizes, _ in self.requests)


def config(*overrides):
    return load_config(None, ["prompts_per_iteration=4", "samples_per_prompt=4", *overrides])


# ----------------------------------------------------------------------------------------------
# gvm-history


def test_gvm_history_presamples_unseen_prompts_and_reuses_every_sample_of_the_visit():
    rule = make_allocator(
        config("allocation=gvm-history", "gvm.presamples=4", "gvm_history.accept_prior=[1,1]")
    )
    batch = prompts("a", "b", "c", "d")
    verdicts = {"a": [1], "b": [1, 0], "c": [0], "d": [0, 0, 0, 1]}
    norms = {"a": 1, "b": 2, "c": 3, "d": 4}
    stand_in = StandIn(verdicts, norms)

    first = rule.allocate(batch, stand_in.context())
    assert stand_in.requests == [(["a", "b", "c", "d"], [4, 4, 4, 4], 0)]
    # p = (accepted + 1) / (4 + 2) = 5/6, 3/6, 1/6, 2/6; G = 1, 2, 2, 4 (c has no accepted
    # pre-sample: the batch's median norm, 2). w = G / sqrt(p + 1e-3 / p) = 1.0947, 2.8228,
    # 4.8131, 6.8972 (sum 15.6278); shares of 16: 1.121, 2.890, 4.928, 7.062 -> floors 1, 2, 4, 7
    # (14); the two largest remainders (c .928, b .890) take the last two samples.
    assert first.sizes.tolist() == [1, 3, 5, 7]
    main = stand_in.sample(batch, first.sizes)
    rule.observe(batch, main, stand_in.context())

    second = rule.allocate(batch, stand_in.context())
    assert len(stand_in.requests) == 2, "a seen prompt needs no pre-samples"
    # one visit = its 4 pre-samples and its main samples: 5, 7, 9, 11 samples, of them accepted
    # 5, 4, 0, 2 (the verdict cycles continue from the pre-samples): p = 6/7, 5/9, 1/11, 3/13;
    # G = 1, 2, 2, 4 (c never accepted: the median of the known norms).
    # w = 1.0794, 2.6789, 6.2650, 8.2496 (sum 18.2729); shares of 16: 0.945, 2.346, 5.486, 7.223
    # -> floors 0, 2, 5, 7 (14); the largest remainders (a .945, c .486) take the last two.
    assert second.sizes.tolist() == [1, 2, 6, 7]
    assert second.presamples is None and second.metrics["history_seen_share"] == 1.0


def test_gvm_history_prior_draws_nothing_for_unseen_prompts():
    rule = make_allocator(
        config("allocation=gvm-history", "gvm_history.unseen=prior", "gvm.presamples=4")
    )
    stand_in = StandIn({})
    allocation = rule.allocate(prompts("a", "b", "c", "d"), stand_in.context())
    assert stand_in.requests == [] and allocation.sizes.tolist() == [4, 4, 4, 4]


# ----------------------------------------------------------------------------------------------
# knapsack


def test_knapsack_gives_unknown_prompts_n_then_solves_on_their_history():
    rule = make_allocator(config("allocation=knapsack", "knapsack.min_history_samples=4"))
    batch = prompts("a", "b", "c", "d")
    stand_in = StandIn({"a": [1], "b": [1, 0], "c": [0], "d": [0, 0, 0, 1]})
    first = rule.allocate(batch, stand_in.context())
    assert first.sizes.tolist() == [4, 4, 4, 4] and first.metrics["known_share"] == 0
    rule.observe(batch, stand_in.sample(batch, first.sizes), stand_in.context())

    second = rule.allocate(batch, stand_in.context())
    # p = 1, 0.5, 0, 0.25 from the 4 samples of the visit, all known. Floors: min_size 2 each
    # (p = 1 and p = 0 too), leaving 8 of 16. Knapsack prompts b and d; costs log(.1)/log(.5)
    # = 3.32 and log(.1)/log(.75) = 8.00 -> 3 + 8 = 11 >= 8: no excess to redistribute.
    # Marginal values v(p, n) = (1 - p^n - q^n) p q^2, first extra v(p, 3), then
    # c (p^(n-1) q + q^(n-1) p), c = p q^2:
    #   b (c = .125):   .09375, .01563, .00781, .00391, ...
    #   d (c = .1406):  .07910, .01648, .01154, .00845, .00628, .00470, ...
    # the 8 largest: b 3 of them, d 5 -> b 2 + 3, d 2 + 5.
    assert second.sizes.tolist() == [2, 5, 2, 7]
    assert second.metrics["knapsack_share"] == 0.5


# ----------------------------------------------------------------------------------------------
# dapo


def dapo_config(*extra):
    return config(
        "allocation=dapo",
        "samples_per_prompt=2",
        "dapo.gen_prompts=6",
        "dapo.max_rounds=3",
        *extra,
    )


def test_dapo_draws_rounds_until_enough_informative_groups_and_trains_on_the_first():
    batch = prompts("b0", "b1", "b2", "b3")
    pool = prompts(*(f"p{k}" for k in range(10)))
    verdicts = {"b0": [1, 0], "b1": [1], "b2": [0], "b3": [0, 1], "p0": [0], "p1": [1, 0]}
    verdicts.update({f"p{k}": [0, 1] for k in range(2, 10)})
    stand_in = StandIn(verdicts, pool=pool)
    allocation = make_allocator(dapo_config()).allocate(batch, stand_in.context())
    # round 0: the batch and 2 further prompts (3 informative); round 1: 6 fresh prompts
    assert stand_in.requests == [
        (["b0", "b1", "b2", "b3", "p0", "p1"], [2] * 6, 0),
        ([f"p{k}" for k in range(2, 8)], [2] * 6, 1),
    ]
    assert len(allocation.presamples.samples) == stand_in.generated == 24
    assert allocation.sizes.tolist() == [0, 0, 0, 0]
    training = allocation.training
    assert [s.text for s in training.samples] == ["b0", "b0", "b3", "b3", "p1", "p1", "p2", "p2"]
    assert training.group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    trained = allocation.training_rollouts(Rollouts([], np.zeros(0), np.zeros(0, np.int64)))
    assert trained.samples == training.samples, "the M-step trains on the kept groups"
    m = allocation.metrics
    assert (m["rounds"], m["informative_groups"], m["budget_shortfall"]) == (2, 9, 0)
    assert m["discarded_samples"] == 16 and m["zero_variance_share"] == pytest.approx(3 / 12)


def test_dapo_that_drops_every_group_reports_the_shortfall():
    batch = prompts("b0", "b1", "b2", "b3")
    pool = prompts(*(f"p{k}" for k in range(20)))
    stand_in = StandIn(defaultdict(lambda: [1]), pool=pool)
    allocation = make_allocator(dapo_config()).allocate(batch, stand_in.context())
    assert [r for _, _, r in stand_in.requests] == [0, 1, 2]  # the round cap
    assert len(allocation.training.samples) == 0 and allocation.metrics["budget_shortfall"] == 4
    assert allocation.metrics["zero_variance_share"] == 1.0
    assert stand_in.lines and "0 of 4 informative groups after 3 rounds" in stand_in.lines[0]


# ----------------------------------------------------------------------------------------------
# reinforce-ada


def test_reinforce_ada_retires_prompts_and_trains_balanced_groups_on_a_global_baseline():
    rule = make_allocator(
        config(
            "allocation=reinforce-ada",
            "prompts_per_iteration=3",
            "reinforce_ada.group_size=2",
            "reinforce_ada.round_samples=2",
            "reinforce_ada.max_rounds=3",
        )
    )
    batch = prompts("a", "b", "c")
    stand_in = StandIn({"a": [1, 1, 0, 1], "b": [1, 0], "c": [0]})
    allocation = rule.allocate(batch, stand_in.context())
    # a: 1 1 | 0 1 (done after round 1); b: 1 0 (done at once); c: never right
    assert stand_in.requests == [
        (["a", "b", "c"], [2, 2, 2], 0),
        (["a", "b", "c"], [2, 0, 2], 1),
        (["a", "b", "c"], [0, 0, 2], 2),
    ]
    assert len(allocation.presamples.samples) == 12
    training = allocation.training
    # a keeps its first right and first wrong sample, b both, c (unfinished) its first two
    assert [s.text for s in training.samples] == ["a", "b", "b", "c", "c", "a"]
    assert training.scores.tolist() == [1, 1, 0, 0, 0, 0]
    assert allocation.metrics["unfinished_share"] == pytest.approx(1 / 3)
    baseline = allocation.baseline
    # a: 3 of 4 right, unbiased std sqrt(3 * 1 / (4 * 3)) = 0.5; b: 1 of 2, sqrt(1 / 2); c: 0
    assert baseline.mean.tolist() == [0.75, 0.5, 0.0]
    assert baseline.std.tolist() == pytest.approx([0.5, math.sqrt(0.5), 1e-6])
    # GRPO's advantages on that baseline: a's trained pair {1, 0} is centred on 0.75 (all 4 of
    # its samples) and scaled by 0.5, not on the pair's own mean 0.5 and std sqrt(0.5); b's pair
    # is all it drew, so it gets +-0.5 / sqrt(0.5); c: 0 - 0 = 0 over std eps
    eps = 1e-6
    b = 0.5 / (math.sqrt(0.5) + eps)
    advantages = ALGORITHMS["grpo"].advantages(
        torch.as_tensor(training.scores, dtype=torch.float32),
        torch.as_tensor(training.group),
        LossConfig(),
        baseline,
    )
    assert advantages.tolist() == pytest.approx(
        [0.25 / (0.5 + eps), b, -b, 0.0, 0.0, -0.75 / (0.5 + eps)]
    )


def test_grpo_advantages_take_the_rule_baseline():
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0])
    group = torch.tensor([0, 0, 1, 1])
    baseline = GroupBaseline(np.array([0.75, 0.5]), np.array([0.5, 0.25]))
    grpo = ALGORITHMS["grpo"].advantages
    scaled = grpo(scores, group, LossConfig(), baseline)
    eps = 1e-6
    expected = [0.25 / (0.5 + eps), -0.75 / (0.5 + eps), 0.5 / (0.25 + eps), -0.5 / (0.25 + eps)]
    assert scaled.tolist() == pytest.approx(expected)
    centred = grpo(scores, group, LossConfig(grpo_scale_by_std=False), baseline)
    assert centred.tolist() == pytest.approx([0.25, -0.75, 0.5, -0.5])
    # without a baseline: each group's own mean and std. Both groups are {1, 0}: mean 0.5,
    # unbiased std sqrt((0.5^2 + 0.5^2) / (2 - 1)) = sqrt(0.5), so A = +-0.5 / (sqrt(0.5) + eps)
    r = 0.5 / (math.sqrt(0.5) + eps)
    assert grpo(scores, group, LossConfig()).tolist() == pytest.approx([r, -r, r, -r])
    assert grpo(scores, group, LossConfig(grpo_scale_by_std=False)).tolist() == pytest.approx(
        [0.5, -0.5, 0.5, -0.5]
    )
    assert ALGORITHMS["raft++"].advantages(scores, group, LossConfig(), baseline).tolist() == [
        1.0,
        0.0,
        1.0,
        0.0,
    ]


# ----------------------------------------------------------------------------------------------
# greso


def greso_config(*extra):
    return config("allocation=greso", "samples_per_prompt=2", "dapo.gen_prompts=4", *extra)


def test_greso_skips_prompts_with_long_all_correct_streaks_and_says_so():
    rule = make_allocator(greso_config("greso.min_keep=0", "dapo.max_rounds=2"))
    batch, pool = prompts("b0", "b1", "b2", "b3"), prompts("p0", "p1", "p2", "p3")
    for _ in range(30):  # 30 all-correct visits each: keep probability 0.5^30
        ids = [r.id for r in batch + pool]
        rule.history.update(ids, [2] * 8, [2] * 8, [0.0] * 8, [0] * 8)
    stand_in = StandIn(defaultdict(lambda: [1, 0]), pool=pool)
    allocation = rule.allocate(batch, stand_in.context())
    assert stand_in.requests == [], "every prompt should have been skipped"
    assert allocation.metrics["prompts_skipped"] == 8
    assert allocation.metrics["budget_shortfall"] == 4
    assert "0 of 4 informative groups" in stand_in.lines[0]


def test_greso_skip_draws_resume_from_its_state_and_bases_adapt_after_the_epoch():
    overrides = ("greso.adapt_after_prompts=4", "greso.initial_base=0.9")
    batch, pool = prompts("b0", "b1", "b2", "b3"), prompts(*(f"p{k}" for k in range(12)))
    verdicts = defaultdict(lambda: [1])  # all right: streaks grow, skips start
    rule = make_allocator(greso_config(*overrides))
    first = StandIn(verdicts, pool=pool)
    rule.allocate(batch, first.context())
    assert (rule.p_easy, rule.p_hard) == (0.9, 0.9), "no adaptation within the first epoch"
    saved = rule.state_dict()

    resumed = make_allocator(greso_config(*overrides))
    resumed.load_state_dict(saved)
    runs = []
    for allocator in (rule, resumed):
        stand_in = StandIn(verdicts, pool=pool)
        for _ in range(3):
            allocator.allocate(batch, stand_in.context())
        runs.append(stand_in.requests)
    assert runs[0] == runs[1]
    assert sum(len(ids) for ids, _, _ in runs[0]) < 3 * 4 * 4, "some prompts should be skipped"
    # all-correct share 1 >= 0.25 / 3: p_easy falls 0.01 per iteration; p_hard rises
    assert rule.p_easy == pytest.approx(0.87) and rule.p_hard == pytest.approx(0.93)


def test_further_prompts_are_a_pure_function_of_iteration_and_round():
    stream = PromptStream(prompts(*(f"q{k}" for k in range(10))), batch_size=4, seed=3)
    first = stream.extra(2, 1, 5, exclude={"q0", "q1"})
    assert [r.id for r in first] == [r.id for r in stream.extra(2, 1, 5, exclude={"q0", "q1"})]
    assert len(first) == 5 and not {"q0", "q1"} & {r.id for r in first}
    assert len(stream.extra(2, 1, 20)) == 10, "at most the whole set, each prompt once"
    others = [[r.id for r in stream.extra(i, k, 10)] for i, k in ((2, 2), (3, 1))]
    assert all(ids != [r.id for r in stream.extra(2, 1, 10)] for ids in others)


# ----------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "override, key",
    [
        ("dapo.max_round=3", "dapo.max_round"),
        ("knapsack.cost_estimate=guess", "knapsack.cost_estimate"),
        ("reinforce_ada.exit_rule=never", "reinforce_ada.exit_rule"),
        ("gvm_history.unseen=skip", "gvm_history.unseen"),
        ("greso.base_range=[0.6,0.9]", "greso.base_range"),
        ("dapo.gen_prompts=2", "dapo.gen_prompts"),
        ("knapsack.min_size=8", "knapsack.min_size"),  # floors above n = 4
        ("allocation=dynamic", "allocation"),
    ],
)
def test_bad_rule_options_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        config(override)


# ----------------------------------------------------------------------------------------------
# Through the trainer


def tiny(*extra):
    return load_config(
        None,
        [
            "model=builtin",
            "train_data=builtin",
            "eval_data=null",
            "data.train_limit=8",
            "prompts_per_iteration=4",
            "samples_per_prompt=2",
            "gvm.presamples=2",
            "rollout.max_new_tokens=24",
            "update.minibatch_size=2",
            "eval.every=0",
            "threads=1",
            "logging.progress=false",
            "logging.tensorboard=false",
            "save_final=false",
            *extra,
        ],
    )


def counting_engine(trainer: Trainer) -> list[int]:
    """Wrap the trainer's engine: the returned list grows by each call's sample count."""
    calls: list[int] = []
    generate = trainer.engine.generate

    def counted(texts, sizes, params):
        out = generate(texts, sizes, params)
        calls.append(len(out))
        return out

    trainer.engine.generate = counted
    return calls


@pytest.mark.parametrize(
    "rule, extra",
    [
        ("gvm-history", ["gvm.grad_norm_samples=1"]),
        ("knapsack", ["knapsack.min_history_samples=2"]),
        ("dapo", ["dapo.gen_prompts=6"]),
        ("greso", ["dapo.gen_prompts=6"]),
        ("reinforce-ada", ["reinforce_ada.round_samples=2"]),
    ],
)
def test_every_generated_sample_is_counted(tmp_path, rule, extra):
    config = tiny("algorithm=grpo", f"allocation={rule}", "iterations=3", *extra)
    trainer = Trainer(config, tmp_path)
    calls = counting_engine(trainer)
    last = trainer.run()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert last["samples_generated"] == sum(calls)
    assert sum(calls) == sum(r["samples"] + r.get("presamples", 0) for r in rows)
    assert all(np.isfinite(r["loss"]) for r in rows if r["trained_samples"])
    if rule in ("dapo", "greso", "reinforce-ada"):  # they draw everything in their rounds
        assert all(r["samples"] == 0 and r["presamples"] > 0 for r in rows)


def test_dapo_run_whose_groups_all_drop_still_completes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(REWARDS, "answer", lambda grade, text: 0.0)  # every group all wrong
    config = tiny("algorithm=grpo", "allocation=dapo", "iterations=1", "dapo.gen_prompts=4")
    last = Trainer(config, tmp_path).run()
    assert last["iteration"] == 1 and last["budget_shortfall"] == 4
    # two rounds of 4 prompts x 2 samples, then the 8 training prompts are used up
    assert last["trained_samples"] == 0 and last["samples_generated"] == 16
    err = capsys.readouterr().err
    assert "0 of 4 informative groups after 2 rounds" in err and "short=4" in err


def _comparable(rows):
    return [
        {k: v for k, v in r.items() if k != "wall_time" and not k.startswith("time_")} for r in rows
    ]


@pytest.mark.parametrize("rule", ["gvm-history", "greso"])
def test_interrupted_run_with_history_resumes_exactly(tmp_path, monkeypatch, rule):
    """Prompts recur from iteration 3 on (8 prompts, 4 per iteration): a resume that lost the
    history would pre-sample (gvm-history) or skip (greso) differently there."""
    extra = ["algorithm=grpo", f"allocation={rule}", "iterations=4", "save_final=true"]
    config = tiny(*extra, "dapo.gen_prompts=4", "greso.adapt_after_prompts=4")
    whole = Trainer(config, tmp_path / "whole")
    assert len(whole.stream.records) == 8  # data.train_limit
    whole.run()

    iteration = Trainer.iteration

    def killed_in_iteration_3(self, k):
        if k == 3:
            raise KeyboardInterrupt("killed")
        return iteration(self, k)

    monkeypatch.setattr(Trainer, "iteration", killed_in_iteration_3)
    with pytest.raises(KeyboardInterrupt):
        Trainer(config, tmp_path / "broken").run()
    monkeypatch.setattr(Trainer, "iteration", iteration)
    Trainer(config, tmp_path / "broken").run()

    whole, resumed = (read_metrics(tmp_path / d / "metrics.jsonl") for d in ("whole", "broken"))
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    assert _comparable(resumed) == _comparable(whole)
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in ("whole", "broken"))
    assert all(torch.equal(a[k], b[k]) for k in a)
