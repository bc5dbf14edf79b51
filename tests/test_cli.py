"""The user's path: fiddler-launch, fiddler generate, Ctrl-C, and nothing left behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import children_of, process_gone, runtime_leftovers

BIN = Path(sys.executable).parent


def wait_for_line(proc: subprocess.Popen, needle: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    seen = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"launcher never printed {needle!r}; output: {''.join(seen)}")


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
def test_launch_generate_stop_leaves_nothing_behind(checkpoints, stop_signal):
    folder = checkpoints["tiny"]
    launcher = subprocess.Popen(
        [BIN / "fiddler-launch", "--model", str(folder), "--workers", "2", "--threads-per-worker", "1",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        wait_for_line(launcher, "ready")
        workers = children_of(launcher.pid)
        assert len(workers) == 2, "one process per worker"
        out = subprocess.run([BIN / "fiddler", "generate", "The mixture of experts", "-n", "8", "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        streamed = subprocess.run([BIN / "fiddler", "generate", "The mixture of experts", "-n", "8"],
                                  capture_output=True, text=True, timeout=120)
        assert streamed.returncode == 0 and "decode:" in streamed.stderr
        assert any(name.startswith("cluster-") for name in runtime_leftovers())
    finally:
        launcher.send_signal(stop_signal)
        launcher.wait(timeout=30)
    assert launcher.returncode == 0
    assert all(process_gone(pid) for pid in workers)
    assert runtime_leftovers() == []

    # the served tokens are transformers' greedy tokens
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompt = torch.tensor([result["prompt_token_ids"]])
    want = ref.generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert result["token_ids"] == want[: len(result["token_ids"])]
    assert result["prefill_tokens_per_second"] > 0


def test_generate_without_a_cluster_says_how_to_start_one():
    out = subprocess.run([BIN / "fiddler", "generate", "hi"], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "fiddler-launch" in out.stderr


def test_run_does_everything_in_one_command(checkpoints):
    out = subprocess.run(
        [BIN / "fiddler", "run", "--model", str(checkpoints["tiny-qwen2-moe"]), "-w", "1", "-n", "4", "--json",
         "--device", "cpu", "Hello there"],
        capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) <= 4 and result["prompt_token_ids"]
    assert runtime_leftovers() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
    ],
)
def test_bad_sampling_flags_fail_before_launching(args, message):
    out = subprocess.run([BIN / "fiddler", "run", "hi", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and message in out.stderr
    assert runtime_leftovers() == []
