"""The user's path: fiddler-launch, fiddler generate, Ctrl-C (also in the middle of an answer), and nothing left
behind."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import children_of, error_line, process_gone, runtime_leftovers, shm_files
from fiddler_moe.cli import fiddler

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
def test_launch_generate_stop_leaves_nothing_behind(checkpoints, reference, cli, stop_signal):
    """`fiddler-launch`; two answers from `fiddler generate`; then Ctrl-C (or SIGTERM) while the real `fiddler`
    executable streams a third: the client is told, the launcher stops cleanly within a bounded time, and no
    process, folder, socket or shared-memory file is left."""
    folder = checkpoints["tiny"]
    launcher = subprocess.Popen(
        [BIN / "fiddler-launch", "--model", str(folder), "--workers", "2", "--threads-per-worker", "1",
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    client = None
    try:
        wait_for_line(launcher, "ready")
        workers = children_of(launcher.pid)
        assert len(workers) == 2, "one process per worker"
        out = cli(fiddler.app, "generate", "The mixture of experts", "-n", "8", "--json")
        assert out.exit_code == 0, out.stderr
        result = json.loads(out.stdout)
        streamed = cli(fiddler.app, "generate", "The mixture of experts", "-n", "8")
        assert streamed.exit_code == 0 and "decode:" in streamed.stderr
        assert any(name.startswith("cluster-") for name in runtime_leftovers())

        client = subprocess.Popen([BIN / "fiddler", "generate", "hello", "-n", "3000"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        client.stdout.read(1)  # generation is under way
        started = time.monotonic()
        launcher.send_signal(stop_signal)
        launcher.wait(timeout=30)
        took = time.monotonic() - started
        err = client.communicate(timeout=30)[1]
    finally:
        if launcher.poll() is None:
            launcher.send_signal(stop_signal)
            launcher.wait(timeout=30)
        if client is not None and client.poll() is None:
            client.kill()
    assert took < 10
    assert launcher.returncode == 0
    assert client.returncode != 0 and ("shutting down" in err or "stopped" in err)
    assert "Traceback" not in err
    assert all(process_gone(pid) for pid in workers)
    assert runtime_leftovers() == []
    assert shm_files() == set()

    # the served tokens are transformers' greedy tokens
    prompt = torch.tensor([result["prompt_token_ids"]])
    with torch.inference_mode():
        want = reference(folder).generate(prompt, max_new_tokens=8, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert result["token_ids"] == want[: len(result["token_ids"])]
    assert result["prefill_tokens_per_second"] > 0


def test_generate_without_a_cluster_says_how_to_start_one(cli):
    assert "fiddler-launch" in error_line(cli(fiddler.app, "generate", "hi"))


def test_run_does_everything_in_one_command(checkpoints, cli):
    out = cli(fiddler.app, "run", "--model", checkpoints["tiny-qwen2-moe"], "-w", "1", "-n", "4", "--json",
              "--device", "cpu", "--num-beams", "2", "Hello there")
    assert out.exit_code == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) <= 4 and result["prompt_token_ids"]
    assert runtime_leftovers() == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "--temperature"),
        (["--top-p", "0"], "--top-p"),
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--num-beams", "0"], "--num-beams"),
        (["--num-beams", "2", "--temperature", "0.7"], "--num-beams"),
    ],
)
def test_bad_sampling_flags_fail_before_launching(cli, args, message):
    out = cli(fiddler.app, "run", "hi", *args)
    assert out.exit_code != 0 and message in out.stderr
    assert runtime_leftovers() == []
