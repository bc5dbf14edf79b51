"""Placement with and without an expert profile: the memory budget exactly, balanced expected load, spread layers,
the expected hit rate, and workers of unequal size."""

from __future__ import annotations

import math
import random

import pytest

from fiddler_moe.coordinator.placement import plan
from fiddler_moe.coordinator.profile import ExpertProfile


def skewed_profile(layers: int, experts: int, seed: int = 0, exponent: float = 1.2) -> ExpertProfile:
    """Zipf-like popularity, a different favourite order in every layer."""
    rng = random.Random(seed)
    counts = {}
    for layer in range(layers):
        order = list(range(experts))
        rng.shuffle(order)
        for rank, e in enumerate(order):
            counts[(layer, e)] = int(100_000 / (rank + 1) ** exponent)
    return ExpertProfile.from_counts(counts, fingerprint="f", model="synthetic", tokens=1000)


def worker_loads(placement, profile) -> list[float]:
    loads = [0.0] * placement.num_workers
    for key, w in placement.owner.items():
        loads[w] += profile.count(key)
    return loads


@pytest.mark.parametrize("budget_experts", [0, 1, 5, 17, 63, 64])
def test_budget_is_respected_exactly(budget_experts):
    profile = skewed_profile(layers=4, experts=16)
    expert_bytes, non_expert = 1000, 5555
    for extra in (0, 1, 999):  # a budget that buys n experts and a bit, never n + 1
        budget = non_expert + budget_experts * expert_bytes + extra
        placement = plan({layer: 16 for layer in range(4)}, expert_bytes, non_expert, budget, 3, profile=profile)
        assert len(placement.hot) * expert_bytes <= budget - non_expert
        assert len(placement.hot) == min(64, budget_experts)
        assert len(placement.hot) + len(placement.owner) == 64
        assert not set(placement.hot) & set(placement.owner)


def test_hot_set_is_the_most_used_and_hit_rate_is_right():
    profile = skewed_profile(layers=4, experts=16)
    placement = plan({layer: 16 for layer in range(4)}, 10, 0, 10 * 6, 2, profile=profile)
    hot_counts = [profile.count(k) for k in placement.hot]
    cold_counts = [profile.count(k) for k in placement.owner]
    assert len(hot_counts) == 6 and min(hot_counts) >= max(cold_counts)
    assert sorted(hot_counts, reverse=True) == sorted(profile.counts.values(), reverse=True)[:6]
    expected = sum(profile.count(k) for k in placement.hot) / profile.total
    assert placement.expected_hit_rate == pytest.approx(expected)
    assert any("expected hit rate" in line and f"{expected:.1%}" in line for line in placement.describe())
    all_hot = plan({layer: 16 for layer in range(4)}, 10, 0, None, 2, profile=profile)
    assert all_hot.expected_hit_rate == 1.0 and all_hot.owner == {}
    assert plan({0: 16}, 10, 0, 0, 2).expected_hit_rate is None  # no profile, no estimate


def test_ties_are_broken_deterministically():
    flat = ExpertProfile.from_counts({(layer, e): 5 for layer in range(3) for e in range(4)}, fingerprint="f",
                                     model="m", tokens=1)
    placement = plan({0: 4, 1: 4, 2: 4}, 10, 0, 40, 2, profile=flat)
    assert placement.hot == [(0, 0), (1, 0), (2, 0), (0, 1)]  # equal counts: the no-profile order, spread over layers
    again = plan({2: 4, 0: 4, 1: 4}, 10, 0, 40, 2, profile=flat)
    assert again.hot == placement.hot and again.owner == placement.owner


@pytest.mark.parametrize("layers, experts, workers", [(32, 8, 4), (16, 64, 4), (8, 128, 6), (24, 8, 3)])
def test_expected_load_is_balanced_and_layers_spread(layers, experts, workers):
    profile = skewed_profile(layers, experts)
    hot = layers  # one hot expert a layer's worth of budget
    placement = plan({layer: experts for layer in range(layers)}, 1, 0, hot, workers, profile=profile)
    loads = worker_loads(placement, profile)
    assert max(loads) / min(loads) < 1.05, loads
    assert sum(placement.expected_load) == pytest.approx(1.0)
    for layer in range(layers):
        cold = sorted((k for k in placement.owner if k[0] == layer), key=lambda k: -profile.count(k))
        top = cold[:workers]
        assert len({placement.owner[k] for k in top}) == len(top), f"layer {layer}: top experts share a worker"
        sizes = [sum(1 for k in cold if placement.owner[k] == w) for w in range(workers)]
        assert max(sizes) <= math.ceil(len(cold) / workers)  # no pile-up where the profile saw little traffic


def test_each_layer_is_balanced_not_just_the_total():
    """A layer call waits for its slowest worker, so one layer's popular experts must not pile up on one worker."""
    profile = skewed_profile(layers=8, experts=64, exponent=0.8)
    placement = plan({layer: 64 for layer in range(8)}, 1, 0, 0, 4, profile=profile)
    for layer in range(8):
        per_worker = [0] * 4
        for (lay, e), w in placement.owner.items():
            if lay == layer:
                per_worker[w] += profile.count((lay, e))
        assert max(per_worker) / min(per_worker) < 1.1, (layer, per_worker)


def test_worker_weights_are_respected_with_a_profile():
    profile = skewed_profile(layers=16, experts=64)
    weights = [4.0, 2.0, 1.0, 1.0]
    placement = plan({layer: 64 for layer in range(16)}, 1, 0, 0, 4, profile=profile, worker_weights=weights)
    loads = worker_loads(placement, profile)
    per_weight = [load / w for load, w in zip(loads, weights, strict=True)]
    assert max(per_weight) / min(per_weight) < 1.1, per_weight  # expected time balanced, not expected work
    sizes = [len(placement.shard(w)) for w in range(4)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert any("weight 4" in line for line in placement.describe())


def test_worker_weights_are_respected_without_a_profile():
    placement = plan({layer: 8 for layer in range(12)}, 1, 0, 0, 3, worker_weights=[2, 1, 1])
    assert [len(placement.shard(w)) for w in range(3)] == [48, 24, 24]
    for layer in range(12):  # every layer still uses every worker
        assert {w for (lay, _), w in placement.owner.items() if lay == layer} == {0, 1, 2}
    equal = plan({layer: 8 for layer in range(12)}, 1, 0, 0, 3, worker_weights=[5, 5, 5])
    assert equal.owner == plan({layer: 8 for layer in range(12)}, 1, 0, 0, 3).owner  # equal weights: the old rule


def test_bad_worker_weights_and_foreign_profiles_are_refused():
    with pytest.raises(ValueError, match="one weight per worker"):
        plan({0: 4}, 1, 0, 0, 2, worker_weights=[1.0])
    with pytest.raises(ValueError, match="positive"):
        plan({0: 4}, 1, 0, 0, 2, worker_weights=[1.0, 0.0])
    foreign = ExpertProfile.from_counts({(5, 0): 3}, fingerprint="f", model="other", tokens=1)
    with pytest.raises(ValueError, match="another model/checkpoint"):
        plan({0: 4}, 1, 0, 0, 2, profile=foreign)


def test_empty_profile_falls_back_to_the_default_rule():
    empty = ExpertProfile.from_counts({}, fingerprint="f", model="m", tokens=0, experts_per_layer={0: 8, 1: 8})
    with_empty = plan({0: 8, 1: 8}, 1, 0, 3, 2, profile=empty)
    without = plan({0: 8, 1: 8}, 1, 0, 3, 2)
    assert with_empty.hot == without.hot and with_empty.owner == without.owner
    assert any("no routings" in n for n in with_empty.notes)
