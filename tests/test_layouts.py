"""Checkpoint layouts: per-expert tensors (what save_pretrained writes) and fused [num_experts, ...] tensors."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import save_file

from fiddler_moe.launch.cluster import Cluster


def test_fused_expert_tensors(checkpoints, reference, tmp_path):
    source = checkpoints["tiny-qwen3-moe"]
    ref = reference(source)
    fused = tmp_path / "fused"
    fused.mkdir()
    for f in source.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            shutil.copy(f, fused / f.name)
    # transformers' in-memory names: mlp.experts.gate_up_proj [num_experts, 2 * intermediate, hidden]
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, fused / "model.safetensors", metadata={"format": "pt"})

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.inference_mode():
        want = ref(input_ids=ids).logits
    with Cluster(fused, workers=2, hot_experts=3, device="cpu", quiet=True) as cluster:
        got = cluster.logits(ids)
        layout = cluster.coordinator.layout
    assert all(ref.index is not None for src in layout.experts.values() for ref in src.gate_up)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
