"""Synthetic checkpoints: they load with stock transformers, are deterministic, and refuse what won't fit."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from fiddler_moe.host import paths
from fiddler_moe.launch import synthetic
from fiddler_moe.launch.synthetic import PRESETS, build_tokenizer, estimated_bytes, write_checkpoint

TINY = ["tiny", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-gpt-oss"]
PROMPT = "The router picks two experts for every token, and the rest stay cold."


@pytest.fixture(scope="module")
def tiny_checkpoints(checkpoints) -> dict[str, Path]:
    """The session's tiny checkpoints: written by write_checkpoint with its defaults (float32, seed 0)."""
    assert TINY == list(checkpoints)
    return checkpoints


def safetensors_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def forward(folder: Path, text: str = PROMPT, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model, tokenizer, model(**inputs, output_router_logits=True)


@pytest.mark.parametrize("name", TINY)
def test_tiny_preset_loads_and_runs(tiny_checkpoints, name):
    preset = PRESETS[name]
    model, tokenizer, out = forward(tiny_checkpoints[name])

    assert model.config.model_type == preset.architecture
    assert out.logits.shape[-1] == len(tokenizer) == model.config.vocab_size == preset.vocab_size
    assert torch.isfinite(out.logits).all()
    assert out.logits.std() > 0
    # Token ids agree between config, generation config and tokenizer.
    generation = GenerationConfig.from_pretrained(tiny_checkpoints[name])
    assert generation.do_sample is False
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(model.config, attr) == getattr(tokenizer, attr) == getattr(generation, attr)
    # estimated_bytes counts exactly the parameters transformers builds.
    n_params = sum(p.numel() for p in model.parameters())
    assert estimated_bytes(preset, torch.float32) == 4 * n_params
    assert estimated_bytes(preset, torch.bfloat16) == 2 * n_params


@pytest.mark.parametrize("name", TINY)
def test_bfloat16_checkpoint_gives_finite_logits(tmp_path, name):
    folder = write_checkpoint(name, tmp_path / name, dtype=torch.bfloat16)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    model, _, out = forward(folder, PROMPT * 4, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert torch.isfinite(out.logits).all()


def test_checkpoint_uses_published_tensor_names(tiny_checkpoints):
    # The worker loads single experts by name, so the layout must be the published one, not the fused one.
    from safetensors import safe_open

    with safe_open(tiny_checkpoints["tiny"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.block_sparse_moe.experts.7.w1.weight" in keys
    assert "model.layers.3.block_sparse_moe.gate.weight" in keys
    with safe_open(tiny_checkpoints["tiny-qwen2-moe"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in keys


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tiny_checkpoints):
    again = write_checkpoint("tiny", tmp_path / "again", seed=0)
    other = write_checkpoint("tiny", tmp_path / "other", seed=1)
    reference = safetensors_bytes(tiny_checkpoints["tiny"])
    assert safetensors_bytes(again) == reference
    assert safetensors_bytes(other) != reference
    assert (again / "tokenizer.json").read_bytes() == (tiny_checkpoints["tiny"] / "tokenizer.json").read_bytes()


def test_write_leaves_callers_rng_alone(tmp_path):
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    write_checkpoint("tiny-qwen3-moe", tmp_path / "m", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_max_shard_size_writes_index_and_still_loads(tmp_path, tiny_checkpoints):
    folder = write_checkpoint("tiny", tmp_path / "sharded", max_shard_size="200KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (folder / "model.safetensors").exists()
    assert all((folder / shard).is_file() for shard in shards)
    # Same seed, different sharding: the same model.
    _, _, sharded = forward(folder)
    _, _, single = forward(tiny_checkpoints["tiny"])
    assert torch.equal(sharded.logits, single.logits)


def test_tokenizer_round_trips_and_chats(tiny_checkpoints):
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["tiny"])
    for text in [PROMPT, "  Spaces,\ttabs\nand ~odd~ symbols: #$%&*+<=>?@\\^_`|", "zebra quixotic 31337"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # The embedded text trains the tiny vocabulary fully: no filler tokens.
    assert not any(token.startswith("<filler_") for token in tokenizer.get_vocab())

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is an expert?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<s>") and prompt.endswith("<|assistant|>\n")
    assert "<|user|>\nWhat is an expert?</s>" in prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids.count(tokenizer.eos_token_id) == 2
    assert tokenizer.decode(ids) == prompt


def test_large_vocab_tokenizer_is_padded_to_exact_size():
    tokenizer = build_tokenizer(32000)
    assert len(tokenizer) == 32000
    assert tokenizer.convert_ids_to_tokens(31999) == "<filler_31999>"
    ids = tokenizer(PROMPT)["input_ids"]
    assert max(ids) < 1000  # fillers are never produced by encoding
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    assert tokenizer.get_vocab() == build_tokenizer(32000).get_vocab()


def test_router_sends_tokens_to_different_experts(tiny_checkpoints):
    for name in TINY:
        _, _, out = forward(tiny_checkpoints[name])
        top_k = PRESETS[name].top_k
        for layer, logits in enumerate(out.router_logits):
            chosen = {tuple(sorted(row)) for row in logits.topk(top_k, dim=-1).indices.tolist()}
            assert len(chosen) > 1, f"{name} layer {layer}: every token picked experts {chosen}"
        assert all(torch.all(logits.std(dim=-1) > 0) for logits in out.router_logits)


def test_mixtral_8x7b_refuses_when_memory_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "available_memory_bytes", lambda: 2 * 10**9)
    needed = estimated_bytes(PRESETS["mixtral-8x7b"], torch.bfloat16)
    assert 93e9 < needed < 94e9  # the real 46.7 B parameters
    with pytest.raises(MemoryError, match=r"needs about 9\d\.\d GB of free memory \(93\.4 GB of weights.*only 2\.0 GB"):
        write_checkpoint("mixtral-8x7b", tmp_path / "big", dtype=torch.bfloat16)
    # Refused before anything was built: no folder, no staging folder.
    assert list(tmp_path.iterdir()) == []


def test_refuses_when_disk_is_short(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "free_disk_bytes", lambda folder: 10**6)
    with pytest.raises(OSError, match=r"needs about 0\.\d GB of disk.*only 0\.0 GB is free"):
        write_checkpoint("tiny", tmp_path / "full")
    assert list(tmp_path.iterdir()) == []


def test_builtin_model_is_written_once_in_fiddler_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FIDDLER_CACHE", str(tmp_path))
    assert paths.cache_dir() == tmp_path
    first = synthetic.builtin_model_path()
    assert first.parent == tmp_path
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.iterdir()}
    second = synthetic.builtin_model_path()
    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in second.iterdir()} == mtimes
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no staging folder left behind
    assert AutoModelForCausalLM.from_pretrained(first).config.model_type == "mixtral"


def test_cache_dir_fallbacks(tmp_path, monkeypatch):
    monkeypatch.delenv("FIDDLER_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "xdg" / "fiddler-moe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.cache_dir() == tmp_path / "home" / ".cache" / "fiddler-moe"


def test_incomplete_folder_is_not_overwritten(tmp_path):
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="delete it or choose another folder"):
        write_checkpoint("tiny", folder)
    assert [p.name for p in folder.iterdir()] == ["config.json"]


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="tiny-qwen3-moe"):
        write_checkpoint("huge", tmp_path / "x")


def test_racing_writers_both_end_with_a_valid_folder(tmp_path):
    folder = tmp_path / "raced"
    context = multiprocessing.get_context("spawn")  # fork after torch threads start can deadlock
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:  # each child imports the writer alone
        results = list(pool.map(functools.partial(write_checkpoint, "tiny-qwen2-moe", seed=5), [folder] * 2))
    assert results == [folder] * 2
    assert sorted(os.listdir(tmp_path)) == ["raced"]
    _, _, out = forward(folder)
    assert torch.isfinite(out.logits).all()
