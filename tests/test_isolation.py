"""Only activations cross process boundaries: workers are their own processes and the coordinator holds no
cold expert."""

from __future__ import annotations

import os

import pytest
import torch

from fiddler_moe.coordinator.placement import parse_size, plan


@pytest.mark.cluster("tiny", workers=3, hot_experts=5)
def test_workers_are_processes_and_coordinator_holds_no_cold_expert(cluster):
    coordinator = cluster.coordinator
    pids = cluster.worker_pids
    assert len(set(pids)) == 3 and os.getpid() not in pids
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)

    placement = coordinator.placement
    assert set(coordinator.dispatcher.hot) == set(placement.hot) and len(placement.hot) == 5
    assert coordinator.cold_expert_tensors_held() == 0
    for layer in coordinator.layout.moe_layers:  # transformers' own expert parameters were never materialised
        assert all(p.device.type == "meta" for p in layer.module.parameters())
    # what the coordinator holds is the non-expert weights plus the hot experts, nothing more
    held = sum(p.numel() * p.element_size() for p in coordinator.model.parameters() if p.device.type != "meta")
    held += sum(w.nbytes for w in coordinator.dispatcher.hot.values())
    layout = coordinator.layout
    assert held == layout.non_expert_bytes + 5 * layout.expert_bytes

    before = [link.requests for link in coordinator.links]
    cluster.logits(torch.tensor([[1, 5, 9, 30]]))
    busy = [link.requests - n for link, n in zip(coordinator.links, before)]
    assert all(n > 0 for n in busy), "every worker computed some of the cold experts"


def test_cold_experts_of_a_layer_land_on_different_workers():
    placement = plan({0: 8, 1: 8, 2: 8}, expert_bytes=100, non_expert_bytes=1000, device_memory=1000 + 300,
                     num_workers=3)
    assert len(placement.hot) == 3  # the budget after non-expert weights buys exactly three experts
    assert {layer for layer, _ in placement.hot} == {0, 1, 2}  # spread over the layers
    for layer in range(3):
        owners = [w for (lay, _), w in placement.owner.items() if lay == layer]
        assert len(set(owners)) == 3
    sizes = [len(placement.shard(w)) for w in range(3)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 21


def test_placement_budget_edges():
    assert plan({0: 4}, 10, 100, device_memory=0, num_workers=1).hot == []
    assert len(plan({0: 4}, 10, 100, device_memory=None, num_workers=0).hot) == 4
    assert len(plan({0: 4}, 10, 100, device_memory=10**9, num_workers=1).hot) == 4
    assert plan({0: 4}, 10, 100, device_memory=50, num_workers=1).notes  # budget below non-expert weights
    try:
        plan({0: 4}, 10, 100, device_memory=0, num_workers=0)
    except ValueError as e:
        assert "--workers" in str(e)
    else:
        raise AssertionError("cold experts without workers must be refused")


def test_parse_size():
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("0") == 0
    for bad in ("lots", "-1G", "12 parsecs", ""):
        try:
            parse_size(bad)
        except ValueError as e:
            assert "20GiB" in str(e)
        else:
            raise AssertionError(bad)


def test_a_worker_maps_apart_only_allocations_large_against_its_shard():
    """A worker serves allocations from a 64th of its shard on (512 KiB at least) from mappings of their own, so a
    prefill's temporaries below that stay in the heap instead of costing page faults on every call, up to the
    largest threshold glibc would choose itself; the C library takes it (checked in a process of its own: the
    setting stays for the life of a process)."""
    import subprocess
    import sys

    from fiddler_moe.host import memory

    assert memory.large_allocation(0) == memory.LARGE_ALLOCATION
    assert memory.large_allocation(1344 << 20) == 21 << 20  # mini's shard in bfloat16
    assert memory.large_allocation(100 << 30) == memory.LARGEST_THRESHOLD
    code = ("from fiddler_moe.host import memory; "
            "print(memory.map_large_allocations_apart(memory.large_allocation(1344 << 20)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True"]
