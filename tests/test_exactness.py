"""The cluster computes transformers' own function: same logits, same greedy tokens, in every placement."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fiddler_moe.launch.cluster import Cluster

PROMPTS = ["The mixture of experts", "Hello", "Offloading experts to the CPU saves memory bandwidth on small GPUs"]
PLACEMENTS = {"all-cold": 0, "mixed": 5, "all-hot": 10_000}
PRESETS = ["tiny", "tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-gpt-oss"]
NEW_TOKENS = 32


def batch(folder):
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert enc["attention_mask"].sum(1).unique().numel() > 1, "prompts must have unequal lengths"
    return enc["input_ids"], enc["attention_mask"]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.fixture(scope="module")
def expected(checkpoints, reference):
    """transformers' answers for a preset, computed once: (input ids, mask, logits, prompt, greedy tokens)."""
    answers = {}

    def answer(preset):
        if preset not in answers:
            folder = checkpoints[preset]
            input_ids, mask = batch(folder)
            with torch.inference_mode():
                logits = reference(folder)(input_ids=input_ids, attention_mask=mask).logits
                prompt = input_ids[2:3]
                tokens = reference(folder).generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                                    do_sample=False)[0, prompt.shape[1]:]
            answers[preset] = input_ids, mask, logits, prompt, tokens.tolist()
        return answers[preset]

    return answer


# One shared cluster per case (tests elsewhere that need the same one use it too, see conftest.SharedClusters).
CASES = [pytest.param(preset, placement, workers, id=f"{preset}-{placement}-{workers}",
                      marks=pytest.mark.cluster(preset, workers=workers, hot_experts=PLACEMENTS[placement]))
         for preset in PRESETS for placement in PLACEMENTS for workers in (1, 3)]


@pytest.mark.parametrize("preset, placement, workers", CASES)
def test_logits_and_greedy_tokens_match_transformers(cluster, expected, preset, placement, workers):
    input_ids, mask, want_logits, prompt, want_tokens = expected(preset)
    stats = cluster.coordinator.dispatcher.stats
    hot_before, cold_before = stats.hot_pairs, stats.cold_pairs
    got_logits = cluster.logits(input_ids, mask)
    got = cluster.generate(prompt[0].tolist(), max_new_tokens=NEW_TOKENS, ignore_eos=True)
    hot, cold = stats.hot_pairs - hot_before, stats.cold_pairs - cold_before

    assert len(cluster.worker_pids) == workers
    real = mask.bool()  # padded positions are not compared: both sides mask them, their values are arbitrary
    assert relative_error(got_logits[real], want_logits[real]) < 1e-5
    assert got.token_ids == want_tokens
    assert len(got.token_ids) == NEW_TOKENS
    # the placement really was what the test says: work went where it should
    if placement == "all-cold":
        assert hot == 0 and cold > 0
    elif placement == "all-hot":
        assert cold == 0 and hot > 0
    else:
        assert cold > 0 and hot > 0


def test_multi_shard_checkpoint_with_index(sharded_checkpoint, reference):
    folder = sharded_checkpoint
    assert (folder / "model.safetensors.index.json").exists()
    input_ids, mask = batch(folder)
    with torch.inference_mode():
        want = reference(folder)(input_ids=input_ids, attention_mask=mask).logits
    with Cluster(folder, workers=2, device="cpu", quiet=True) as cluster:
        got = cluster.logits(input_ids, mask)
    assert relative_error(got[mask.bool()], want[mask.bool()]) < 1e-5


@pytest.mark.parametrize("path", ["auto", "onednn"])
def test_bfloat16_fast_paths_keep_transformers_greedy_tokens(tmp_path, request, path):
    """bfloat16 on the CPU takes the fast paths (experts and the coordinator's linear layers): `auto`, this CPU's
    default (the AMX kernel where the CPU has AMX, packed for oneDNN where the CPU supports it, else the AVX2 kernel for
    decoding rows and float32 products for batches of rows, the prompt here), and oneDNN's packed weights where
    PyTorch has them; the tokens stay transformers' own."""
    if path == "onednn":
        request.getfixturevalue("onednn_bfloat16_path")
    from fiddler_moe.coordinator.cpu_linear import _dense_forward
    from fiddler_moe.experts.compute import AVX512_BFLOAT16, PACK_BFLOAT16, UPCAST_BFLOAT16
    from fiddler_moe.launch.synthetic import write_checkpoint

    folder = write_checkpoint("tiny", tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    with torch.inference_mode():
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False)[0, prompt.shape[1]:]
    with Cluster(folder, workers=1, device="cpu", quiet=True) as cluster:
        got = cluster.generate(prompt[0].tolist(), max_new_tokens=16, ignore_eos=True)
        modules = list(cluster.coordinator.model.modules())
        packed = [m for m in modules if hasattr(m, "packed_weight")]
        dense = [m for m in modules if getattr(m.forward, "__func__", None) is _dense_forward]
    assert got.token_ids == want.tolist()
    assert bool(packed) == PACK_BFLOAT16
    assert bool(dense) == (UPCAST_BFLOAT16 or AVX512_BFLOAT16)


def test_avx512_bfloat16_path_keeps_transformers_tokens_and_logits(tmp_path, avx512_bfloat16_path):
    """FIDDLER_BF16_PATH=avx512: the workers' C loop and the coordinator's linear layers decode through the
    AVX512-BF16 kernel, prompts through PyTorch's linear; greedy tokens are transformers' own and the logits within
    bfloat16's tolerance of its."""
    from fiddler_moe.native import kernels
    from fiddler_moe.launch.synthetic import write_checkpoint

    folder = write_checkpoint("tiny", tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    prompt = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 47, 48]])
    input_ids, mask = batch(folder)
    with torch.inference_mode():
        want = ref.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16,
                            do_sample=False)[0, prompt.shape[1]:]
        want_logits = ref(input_ids=input_ids, attention_mask=mask).logits
    with Cluster(folder, workers=1, device="cpu", quiet=True) as cluster:
        got = cluster.generate(prompt[0].tolist(), max_new_tokens=16, ignore_eos=True)
        got_logits = cluster.logits(input_ids, mask)
        dense = [m for m in cluster.coordinator.model.modules() if getattr(m, "bf16_isa", 0)]
        served_in_c = cluster.coordinator.dispatcher._shm_calls
    assert got.token_ids == want.tolist()
    assert relative_error(got_logits[mask.bool()], want_logits[mask.bool()]) < 1e-2
    assert dense and all(m.bf16_isa == kernels.BF16_ISA_AVX512 for m in dense)
    assert served_in_c, "the decoding steps went through shm_call.c"


def test_grouping_by_expert_is_the_same_for_decode_steps_and_batches(monkeypatch):
    """Decode steps group their few (token, k) pairs with Python lists, batches with tensor ops: same answer."""
    from fiddler_moe.coordinator import dispatch

    generator = torch.Generator().manual_seed(3)
    for tokens, top_k, experts in [(1, 2, 8), (3, 2, 8), (5, 8, 64), (8, 8, 16)]:
        index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
        small = dispatch._group_by_expert(index)
        monkeypatch.setattr(dispatch, "SMALL_CALL_PAIRS", 0)
        large = dispatch._group_by_expert(index)
        monkeypatch.undo()
        assert isinstance(small[0], list) and isinstance(large[0], torch.Tensor)
        for got in (small, large):
            order, token_of, groups = (torch.as_tensor(got[0]), torch.as_tensor(got[1]), got[2])
            flat = index.reshape(-1)
            assert torch.equal(flat[order], flat.sort(stable=True).values)  # grouped by expert
            assert torch.equal(order, torch.argsort(flat, stable=True))  # ties keep token order
            assert torch.equal(token_of, order // top_k)
            assert groups == sorted(collections.Counter(flat.tolist()).items())
