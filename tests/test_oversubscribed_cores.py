"""More local workers than cores is the user's choice, as a thread count is in other tools: the plan and the start
warn that the cores are oversubscribed, and the cluster runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import runtime_leftovers
from typer.testing import CliRunner

from fiddler_moe.cli import launch

BIN = Path(sys.executable).parent


def test_more_workers_than_cores_start_with_a_warning(checkpoints):
    cores = len(os.sched_getaffinity(0))
    flags = ["--model", str(checkpoints["tiny"]), "--workers", str(cores + 1), "--numa", "off", "--device", "cpu"]
    plan = CliRunner().invoke(launch.app, ["--dry-run", *flags])
    assert plan.exit_code == 0, plan.output
    assert any(line.startswith("warning: ") and "cores are oversubscribed" in line
               for line in plan.stdout.splitlines()), plan.stdout
    assert f"worker {cores}: unpinned" in plan.stdout  # every worker asked for is planned

    out = subprocess.run([BIN / "fiddler", "run", *flags, "-n", "2", "The mixture of experts"], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "warning: " in out.stderr and "cores are oversubscribed" in out.stderr
    assert "decode:" in out.stderr  # it generated
    assert runtime_leftovers() == []
