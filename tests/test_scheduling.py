"""The per-layer-call decision: which cold experts to move to the device, on synthetic cost tables; the cost model's
curves, cache file and measurements; the Scheduler wrapper on CPU-only setups."""

from __future__ import annotations

import itertools
import json
import logging
import random
import time

import pytest
import torch

from fiddler_moe.coordinator.scheduling import (
    CostModel,
    CostModelError,
    Curve,
    Scheduler,
    decide,
    load_or_measure,
    machine_key,
    makespan,
    measure_copy_seconds,
    measure_cost_model,
    measure_worker_curve,
    copied_tensors,
    shape_key,
)
from fiddler_moe.experts import quant
from fiddler_moe.experts.compute import ExpertKernel, ExpertWeights
from fiddler_moe.protocol.messages import KernelSpec

MS = 1e-3


def gpu_box(copy_ms: float = 10.0) -> CostModel:
    """A CPU worker at 2 ms + 0.1 ms/row per expert; a GPU at 0.1 ms + 0.002 ms/row; copying an expert costs copy_ms."""
    return CostModel(worker=Curve.line(2 * MS, 0.1 * MS), device=Curve.line(0.1 * MS, 0.002 * MS),
                     copy_seconds=copy_ms * MS, machine="test box", shape="test shape")


def test_decode_rows_stay_on_the_workers():
    cost = gpu_box()
    rows = {e: 1 for e in range(8)}
    owner = {e: e % 4 for e in range(8)}
    assert decide(rows, owner, 4, cost, 0.0, staging_slots=8) == set()
    few = {0: 3, 5: 2}  # a few decoding sequences: still cheaper to compute where the weights are
    assert decide(few, {0: 0, 5: 1}, 2, cost, 0.0, staging_slots=8) == set()


def test_long_prefill_moves_the_popular_expert():
    cost = gpu_box()
    rows = {0: 512, 1: 20, 2: 15, 3: 30}
    owner = {0: 0, 1: 1, 2: 0, 3: 1}
    moved = decide(rows, owner, 2, cost, device_busy_seconds=2 * MS, staging_slots=4)
    assert moved == {0}
    assert makespan(rows, owner, 2, cost, 2 * MS, moved) < makespan(rows, owner, 2, cost, 2 * MS)


def test_a_single_row_never_moves_even_if_the_table_says_so():
    free_copies = CostModel(worker=Curve.line(50 * MS, 0), device=Curve.line(0, 0), copy_seconds=0.0)
    assert decide({0: 1}, {0: 0}, 1, free_copies, 0.0, staging_slots=1) == set()
    assert decide({0: 2}, {0: 0}, 1, free_copies, 0.0, staging_slots=1) == {0}


def test_ties_are_deterministic():
    cost = gpu_box()
    owner = {e: e % 2 for e in range(4)}
    rows = {e: 256 for e in range(4)}  # two workers, each with two identical experts
    first = decide(rows, owner, 2, cost, 0.0, staging_slots=2)
    assert first == {0, 1}  # one from each worker (moving two from one worker leaves the other as late), lowest ids
    assert all(decide(dict(reversed(list(rows.items()))), owner, 2, cost, 0.0, 2) == first for _ in range(3))
    # one slot: moving one expert leaves the other worker as late as before, so nothing moves
    assert decide(rows, owner, 2, cost, 0.0, staging_slots=1) == set()


def test_staging_slots_bound_the_moves():
    cost = gpu_box()
    rows = {e: 512 for e in range(6)}
    owner = {e: 0 for e in range(6)}  # one worker has all the work
    assert len(decide(rows, owner, 1, cost, 0.0, staging_slots=2)) == 2
    assert decide(rows, owner, 1, cost, 0.0, staging_slots=0) == set()
    unbounded = decide(rows, owner, 1, cost, 0.0, staging_slots=6)
    assert 2 < len(unbounded) < 6  # the device copies one at a time: at some point the worker is better


def test_moving_everything_would_be_worse_than_moving_some():
    # worker: 10 ms per expert; device: 8 ms copy + 1 ms compute per expert
    cost = CostModel(worker=Curve.line(10 * MS, 0), device=Curve.line(1 * MS, 0), copy_seconds=8 * MS)
    rows = {e: 512 for e in range(4)}
    owner = {e: 0 for e in range(4)}
    moved = decide(rows, owner, 1, cost, 0.0, staging_slots=4)
    assert moved == {0, 1}
    assert makespan(rows, owner, 1, cost, 0.0, moved) == pytest.approx(20 * MS)
    assert makespan(rows, owner, 1, cost, 0.0, set(rows)) == pytest.approx(36 * MS)  # all: the device is last
    assert makespan(rows, owner, 1, cost, 0.0) == pytest.approx(40 * MS)


def test_a_busy_device_takes_nothing():
    cost = gpu_box()
    rows = {0: 512}
    assert decide(rows, {0: 0}, 1, cost, device_busy_seconds=1.0, staging_slots=4) == set()


def test_cpu_only_cost_model_moves_nothing():
    cost = gpu_box()
    cost.can_move = False
    assert decide({0: 4096}, {0: 0}, 1, cost, 0.0, staging_slots=4) == set()


def test_unequal_workers():
    cost = gpu_box()
    rows = {0: 300, 1: 300}
    owner = {0: 0, 1: 1}
    assert decide(rows, owner, 2, cost, 0.0, 1, worker_scale=[1.0, 3.0]) == {1}  # the slow worker's expert moves
    with pytest.raises(ValueError, match="no worker"):
        decide({7: 100}, {}, 2, cost, 0.0, 1)


def test_many_experts_fast_and_never_worse_than_not_moving():
    rng = random.Random(0)
    cost = gpu_box(copy_ms=4.0)
    for trial in range(5):
        rows = {e: int(rng.paretovariate(1.0) * 20) for e in range(256)}
        owner = {e: rng.randrange(8) for e in range(256)}
        started = time.perf_counter()
        moved = decide(rows, owner, 8, cost, 5 * MS, staging_slots=64)
        took = time.perf_counter() - started
        assert took < 0.05, f"decide took {took * 1000:.1f} ms for 256 experts"
        before = makespan(rows, owner, 8, cost, 5 * MS)
        after = makespan(rows, owner, 8, cost, 5 * MS, moved)
        assert after <= before
        assert len(moved) <= 64
    # prefill-like: a few very popular experts, the rest lightly used
    rows = {e: (2048 if e % 37 == 0 else 8) for e in range(256)}
    owner = {e: e % 8 for e in range(256)}
    moved = decide(rows, owner, 8, cost, 0.0, staging_slots=16)
    assert moved and makespan(rows, owner, 8, cost, 0.0, moved) < makespan(rows, owner, 8, cost, 0.0)


def test_greedy_is_close_to_the_best_subset_on_small_cases():
    rng = random.Random(1)
    cost = gpu_box(copy_ms=6.0)
    worst = 1.0
    for _ in range(150):
        n, workers, slots = rng.randint(1, 8), rng.randint(1, 3), rng.randint(1, 4)
        rows = {e: rng.choice([1, 4, 32, 128, 256, 512, 1024]) for e in range(n)}
        owner = {e: rng.randrange(workers) for e in range(n)}
        busy = rng.choice([0.0, 5 * MS, 30 * MS])
        greedy = makespan(rows, owner, workers, cost, busy, decide(rows, owner, workers, cost, busy, slots))
        best = min(
            makespan(rows, owner, workers, cost, busy, subset)
            for k in range(min(slots, n) + 1)
            for subset in itertools.combinations(range(n), k)
        )
        assert greedy <= makespan(rows, owner, workers, cost, busy) + 1e-12
        worst = max(worst, greedy / best)
    assert worst < 1.1, worst


# --- the cost model ---


def test_curves_line_table_and_fit():
    line = Curve.line(1.0, 0.5)
    assert line(0) == 0.0 and line(2) == 2.0
    table = Curve.table([(64, 4.0), (1, 1.0), (16, 2.0)])
    assert table.points == [(1, 1.0), (16, 2.0), (64, 4.0)]
    assert table(1) == 1.0 and table(16) == 2.0 and table(40) == pytest.approx(3.0)
    assert table(128) == pytest.approx(4.0 + 64 * 2.0 / 48)  # the last segment's slope beyond the table
    fitted = Curve.fit_line([(1, 1.5), (2, 2.0), (4, 3.0)])
    assert fitted.a == pytest.approx(1.0) and fitted.b == pytest.approx(0.5)
    with pytest.raises(CostModelError):
        Curve.table([])
    with pytest.raises(CostModelError):
        Curve.table([(0, 1.0)])


def test_cost_file_keeps_one_entry_per_machine_and_shape(tmp_path):
    path = tmp_path / "costs.json"
    a = gpu_box()
    b = CostModel(worker=Curve.table([(1, 0.001), (64, 0.01)]), device=Curve.line(0, 1e-6), copy_seconds=0.02,
                  machine="other box", shape="test shape")
    a.save(path)
    b.save(path)
    assert CostModel.load(path, "test box", "test shape") == a
    assert CostModel.load(path, "other box", "test shape") == b
    assert CostModel.load(path, "test box", "bigger shape") is None
    assert CostModel.load(tmp_path / "none.json", "test box", "test shape") is None
    path.write_text("{oops")
    with pytest.raises(CostModelError, match="delete it"):
        CostModel.load(path, "test box", "test shape")


def tiny_expert(hidden: int = 32, intermediate: int = 64) -> tuple[ExpertKernel, ExpertWeights]:
    kernel = ExpertKernel(KernelSpec(activation="silu"))
    weights = ExpertWeights(torch.randn(2 * intermediate, hidden), torch.randn(hidden, intermediate))
    return kernel, weights


def test_measuring_on_the_cpu(tmp_path):
    kernel, weights = tiny_expert()
    curve = measure_worker_curve(kernel, weights, row_counts=(1, 8, 64), repeats=1, threads=1)
    assert [r for r, _ in curve.points] == [1, 8, 64] and all(s > 0 for _, s in curve.points)
    assert measure_copy_seconds(weights, "cpu") == 0.0
    cost = measure_cost_model(kernel, weights, "cpu", row_counts=(1, 8), repeats=1)
    assert not cost.can_move and cost.shape == shape_key(kernel.spec, weights) and cost.machine == machine_key("cpu")
    cached = load_or_measure(kernel, weights, "cpu", path=tmp_path / "costs.json", row_counts=(1, 8))
    assert load_or_measure(kernel, weights, "cpu", path=tmp_path / "costs.json") == cached  # second time: the cache


def test_a_quantized_experts_costs_are_its_formats(tmp_path):
    """--quantize: the worker curve times the quantized kernel, a move copies the format's bytes, and the cost file
    keeps one entry per format."""
    kernel, weights = tiny_expert()
    formats = {name: quant.QuantizedExpertWeights(quant.quantize(weights.gate_up, name),
                                                  quant.quantize(weights.down, name)) for name in quant.FORMATS}
    keys = {shape_key(kernel.spec, weights)} | {shape_key(kernel.spec, w) for w in formats.values()}
    assert len(keys) == 3 and all(name in shape_key(kernel.spec, w) for name, w in formats.items())
    for name, w in formats.items():
        copied = sum(t.numel() * t.element_size() for t in copied_tensors(w))
        assert copied == quant.expert_nbytes(name, weights.gate_up.shape, weights.down.shape) < weights.nbytes / 3
        cost = load_or_measure(kernel, w, "cpu", path=tmp_path / "costs.json", row_counts=(1, 8))
        assert cost.shape == shape_key(kernel.spec, w) and cost.worker(8) > 0
    assert len(json.loads((tmp_path / "costs.json").read_text())["entries"]) == 2


# --- the Scheduler wrapper ---


def test_scheduler_on_a_cpu_coordinator_moves_nothing_and_says_so_once(caplog):
    owner = {(3, e): e % 2 for e in range(8)}
    scheduler = Scheduler(gpu_box(), owner, num_workers=2, staging_slots=4, device="cpu")
    assert not scheduler.enabled
    with caplog.at_level(logging.INFO, logger="fiddler.scheduling"):
        for _ in range(3):
            schedule = scheduler.schedule(3, {e: 4096 for e in range(8)})
            assert schedule.moved == frozenset() and "CPU" in schedule.reason
    assert len([r for r in caplog.records if "CPU" in r.getMessage()]) == 1
    assert Scheduler(None, owner, 2, 4, device="cuda").disabled_reason.startswith("no cost model")
    assert "staging" in Scheduler(gpu_box(), owner, 2, 0, device="cuda").disabled_reason


def test_scheduler_on_a_gpu_coordinator():
    owner = {(3, e): e % 2 for e in range(4)} | {(4, e): 0 for e in range(4)}
    scheduler = Scheduler(gpu_box(), owner, num_workers=2, staging_slots=4, device="cuda")
    schedule = scheduler.schedule(3, {0: 512, 1: 3, 2: 40, 3: 2}, hot_rows=[100])
    assert schedule.moved == {0}
    assert schedule.predicted_seconds < schedule.no_move_seconds
    assert scheduler.schedule(3, {e: 1 for e in range(4)}).moved == frozenset()  # decode
    assert scheduler.calls == 2 and scheduler.moved_experts == 1
