"""Every MoE family transformers routes through its experts interface computes transformers' logits in the cluster
or is refused in one line before any process starts; a family a new transformers adds is a row here.

Kept affordable: every family's refusal, tiny checkpoint (written by save_pretrained) and checkpoint map run in this
process without workers; clusters (every expert cold, one worker, float32, one prompt) run for one family per
distinct expert function and checkpoint layout (`families.representatives`: the families of a group differ only in
transformers' own code on the coordinator). `python -m fiddler_moe.benchmarks.families` runs a cluster for every
family and prints the README's table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from fiddler_moe.benchmarks import families
from fiddler_moe.coordinator import loading
from fiddler_moe.experts.checkpoint import CheckpointError
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import PRESETS

from conftest import children_of

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[families.Row]:
    transformers.logging.set_verbosity_error()
    return families.survey(tmp_path_factory.mktemp("families"), run_clusters=False)


def test_every_family_is_refused_in_one_line_or_maps_its_tiny_checkpoint(rows):
    failed = [f"{row.family.name}: {row.reason}" for row in rows if row.status not in ("refused", "")]
    assert not failed, "\n".join(failed)
    names = {row.family.name for row in rows}
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= names
    for row in rows:
        if row.status == "refused":
            assert "\n" not in row.reason and len(row.reason) < 400, row.family.name
        else:
            assert row.group and row.checkpoint_bytes < 16 << 20, row.family.name


def test_the_families_with_presets_are_the_presets_the_exactness_tests_run(rows):
    mapped = {row.family.name for row in rows if row.group}
    for architecture, (preset, _) in families.PRESET_TESTS.items():
        assert architecture in mapped and PRESETS[preset].architecture == architecture


def test_a_refused_family_starts_no_process(rows, tmp_path):
    """The refusal is the cluster's own, raised before any worker starts."""
    refused = next(row for row in rows if row.status == "refused" and row.family.model_type is not None)
    families.tiny_config(refused.family).save_pretrained(tmp_path)  # config.json is all it reads
    running = set(children_of(os.getpid()))  # shared clusters of other tests may be up
    with pytest.raises(CheckpointError) as error:
        Cluster(tmp_path, workers=1, device="cpu", quiet=True).start()
    assert str(error.value) == refused.reason
    assert set(children_of(os.getpid())) <= running


def test_one_family_per_expert_function_and_layout_matches_transformers(rows, tmp_path):
    """Each representative's cluster runs its experts in a real worker process on this host (ipc socket, shared
    memory, the checkpoint folder named in LoadShard), as a launched cluster does; one `fiddler-worker --listen`
    serves the clusters one after another, which spares a worker start (a torch import) per family."""
    torch.set_num_threads(1)
    chosen = families.representatives(rows)
    assert len(chosen) >= 5  # plain gated, transposed, clamped, GPT-OSS's, ungated at least
    socket = tmp_path / "worker.sock"
    (tmp_path / "token").write_text("families-token\n")
    worker = subprocess.Popen([Path(sys.executable).parent / "fiddler-worker", "--listen", f"ipc://{socket}",
                               "--threads", "1", "--token-file", str(tmp_path / "token")],
                              env={**os.environ, "FIDDLER_WORKER_QUIET": "1"})
    try:
        options = {"workers": 0, "remote_workers": [f"ipc://{socket}"], "token": "families-token"}
        results = [families.run(row, **options) for row in chosen]
        assert worker.poll() is None, "the worker served every family's cluster"
    finally:
        worker.terminate()
        code = worker.wait(timeout=30)
    wrong = [f"{r.family.name}: {r.status} {r.reason or r.error}" for r in results if r.status != "exact"]
    assert not wrong, "\n".join(wrong)
    assert code == 0 and not socket.exists()


def test_the_readme_table_is_the_survey(rows):
    text = README.read_text()
    match = re.search(r"<!-- families:start -->\n(.*?)\n<!-- families:end -->", text, re.S)
    assert match, "README.md has no families table; paste `python -m fiddler_moe.benchmarks.families` into it"
    table = match.group(1)
    fix = "regenerate it with `python -m fiddler_moe.benchmarks.families`"
    assert f"transformers {transformers.__version__}:" in table, f"the README's table is for another transformers; {fix}"
    listed = {line.split("|")[1].strip().split(" ")[0]: line.split("|")[3].strip()
              for line in table.splitlines() if line.startswith("| ") and not line.startswith("| family")}
    assert set(listed) == {row.family.name for row in rows}, fix
    for row in rows:
        if row.status == "refused":
            assert listed[row.family.name] == f"refused: {row.reason}".replace("|", "/"), f"{row.family.name}; {fix}"
        else:
            assert listed[row.family.name] == "exact", f"{row.family.name}; {fix}"
