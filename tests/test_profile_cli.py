"""The user's path with profiles and live statistics: `fiddler profile` writes a profile, `fiddler-launch --profile`
places by it, `fiddler stats` reads the running cluster and saves a profile; a profile of another checkpoint is
refused in one line."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import error_line, runtime_leftovers
from fiddler_moe.cli import fiddler, launch
from fiddler_moe.coordinator.loading import inspect
from fiddler_moe.coordinator.profile import ExpertProfile
from fiddler_moe.experts.checkpoint import fingerprint
from fiddler_moe.launch.cluster import Cluster

BIN = Path(sys.executable).parent


def lines_until(proc: subprocess.Popen, needle: str, timeout_lines: int = 500) -> str:
    seen = []
    for _ in range(timeout_lines):
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    raise AssertionError(f"never saw {needle!r}; output: {''.join(seen)}")


def top_share(profile: ExpertProfile, n: int) -> float:
    return sum(sorted(profile.counts.values(), reverse=True)[:n]) / profile.total


def test_profile_then_launch_with_it_then_live_stats(checkpoints, cli, tmp_path):
    folder = checkpoints["tiny"]
    prompts = tmp_path / "calibration.jsonl"
    prompts.write_text(
        '{"prompt": "The mixture of experts"}\n'
        '{"text": "Offloading experts to the CPU saves memory bandwidth on small GPUs"}\n'
        '{"messages": [{"role": "user", "content": "Hello there"}]}\n'
    )
    out = cli(fiddler.app, "profile", "--model", folder, "--prompts", prompts, "--out", tmp_path / "p.json",
              "--max-tokens", "2", "-w", "1", "-t", "1", "--device", "cpu")
    assert out.exit_code == 0, out.stderr
    assert "wrote" in out.stderr and "--profile" in out.stderr
    _, layout = inspect(folder, None)
    profile = ExpertProfile.load(tmp_path / "p.json", expected_fingerprint=fingerprint(folder))
    top_k = layout.config.num_experts_per_tok
    assert profile.tokens > 3 * 2  # every prompt, plus the generated tokens read back
    assert profile.total == profile.tokens * top_k * len(layout.moe_layers)
    assert len(profile.counts) == layout.num_experts  # every expert listed, unused ones with 0

    launcher = subprocess.Popen(
        [BIN / "fiddler-launch", "--model", str(folder), "--profile", str(tmp_path / "p.json"), "--hot-experts", "4",
         "--workers", "2", "--threads-per-worker", "1", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        plan = lines_until(launcher, "ready")
        assert f"expected hit rate (profile): {top_share(profile, 4):.1%}" in plan
        generated = cli(fiddler.app, "generate", "--stats", "-n", "4", "The mixture of experts")
        assert generated.exit_code == 0, generated.stderr
        assert "stats of this request:" in generated.stderr and "hit rate:" in generated.stderr
        stats = cli(fiddler.app, "stats", "--json", "--save-profile", tmp_path / "live.json")
        assert stats.exit_code == 0, stats.stderr
        shown = cli(fiddler.app, "stats")
        assert shown.exit_code == 0 and "hit rate" in shown.stdout and "worker-1" in shown.stdout
    finally:
        launcher.send_signal(signal.SIGINT)
        launcher.wait(timeout=30)
    assert launcher.returncode == 0
    assert runtime_leftovers() == []

    data = json.loads(stats.stdout)
    pairs = data["hot_pairs"] + data["moved_pairs"] + data["cold_pairs"]
    assert data["tokens"] > 0 and pairs == data["tokens"] * top_k * len(layout.moe_layers)
    assert data["hit_rate"] == pytest.approx(data["hot_pairs"] / pairs) and 0 < data["hit_rate"] < 1
    assert data["expected_hit_rate"] == pytest.approx(top_share(profile, 4))
    assert [w["name"] for w in data["workers"]] == ["worker-0", "worker-1"]
    assert all(w["requests"] > 0 and w["busy_seconds"] > 0 for w in data["workers"])
    saved = ExpertProfile.load(tmp_path / "live.json", expected_fingerprint=fingerprint(folder))
    assert saved.total == pairs and saved.tokens == data["tokens"]
    assert saved.layer_counts(layout.moe_layers[0].layer) == data["routed"][str(layout.moe_layers[0].layer)]


def test_the_most_used_experts_are_hot_and_popular_cold_ones_spread(checkpoints, reference, tmp_path):
    folder = checkpoints["tiny"]
    _, layout = inspect(folder, None)
    keys = sorted(layout.experts)
    popularity = list(range(1, len(keys) + 1))
    random.Random(4).shuffle(popularity)
    counts = dict(zip(keys, popularity))  # all different: the hot set is unambiguous
    path = ExpertProfile.from_counts(counts, fingerprint=fingerprint(folder), model="tiny", tokens=100).save(
        tmp_path / "skewed.json")
    most_used = set(sorted(keys, key=lambda k: -counts[k])[:5])

    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
    with torch.inference_mode():
        want = reference(folder)(input_ids=ids).logits
    with Cluster(folder, workers=2, hot_experts=5, profile=path, device="cpu", quiet=True) as cluster:
        placement = cluster.coordinator.placement
        assert set(placement.hot) == most_used == set(cluster.coordinator.dispatcher.hot)
        for layer in layout.moe_layers:  # a layer's two most used cold experts run in parallel
            cold = sorted((k for k in placement.owner if k[0] == layer.layer), key=lambda k: -counts[k])
            assert placement.owner[cold[0]] != placement.owner[cold[1]]
        got = cluster.logits(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5


@pytest.mark.parametrize("command", ["fiddler-launch", "fiddler run"])
def test_a_profile_of_another_checkpoint_is_refused_in_one_line(checkpoints, cli, tmp_path, command):
    tiny = checkpoints["tiny"]
    path = ExpertProfile.from_counts({(0, 1): 5}, fingerprint=fingerprint(tiny), model=str(tiny), tokens=3).save(
        tmp_path / "tiny.json")
    args = ["--model", checkpoints["tiny-qwen3-moe"], "--profile", path, "-w", "1", "-t", "1", "--device", "cpu"]
    out = cli(launch.app, *args) if command == "fiddler-launch" else cli(fiddler.app, "run", *args, "hello")
    assert out.exit_code == 2
    line = error_line(out)
    assert line.startswith("error: profile") and "another model/checkpoint" in line
    assert "fiddler profile --model" in line
    assert runtime_leftovers() == []
