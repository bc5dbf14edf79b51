"""Short queries' attention on a CPU coordinator, grouped or in float32 (coordinator/cpu_attention.py,
FIDDLER_CPU_ATTENTION)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from conftest import runtime_leftovers, shm_files
from fiddler_moe.coordinator import cpu_attention
from fiddler_moe.launch.cluster import Cluster
from fiddler_moe.launch.synthetic import write_checkpoint
from test_exactness import batch, relative_error

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 32
MODULE = SimpleNamespace(num_key_value_groups=HEADS // KV_HEADS, is_causal=True, training=False)


def inputs(rows: int, query: int, cached: int, seed: int = 0):
    """bfloat16 query, key, value of a decoding step, and a boolean mask whose rows are left-padded by 0, 1, 2..."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, HEADS, query, HEAD_DIM, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(rows, KV_HEADS, cached, HEAD_DIM, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(rows, 1, query, cached, dtype=torch.bool).tril(cached - query)
    for row in range(rows):
        mask[row, :, :, :row] = False
    return q, k, v, mask


def exact(q, k, v, mask) -> torch.Tensor:
    """The attention of the same bfloat16 values in float64, laid out as transformers returns it."""
    groups = HEADS // KV_HEADS
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) / HEAD_DIM ** 0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.transpose(1, 2)


@pytest.mark.parametrize("rows, query", [(1, 1), (4, 1), (2, 5)])
def test_a_short_query_is_the_exact_attention_rounded_once(rows, query):
    q, k, v, mask = inputs(rows, query, cached=70)
    got, _ = cpu_attention.sdpa_short_queries_in_float32(MODULE, q, k, v, mask, scaling=HEAD_DIM ** -0.5)
    want = exact(q, k, v, mask)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # float32 all the way, rounded to bfloat16 at the end: within one rounding (2^-9 relative) of the exact result
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-6).all()
    bf16, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=HEAD_DIM ** -0.5)
    assert (bf16.double() - want).abs().max() >= (got.double() - want).abs().max(), "never worse than bfloat16's"


def test_a_long_query_and_a_float32_model_keep_transformers_attention():
    q, k, v, mask = inputs(1, cpu_attention.FLOAT32_MAX_QUERY + 1, cached=80)
    got, _ = cpu_attention.sdpa_short_queries_in_float32(MODULE, q, k, v, mask, scaling=0.1)
    want, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.1)
    assert torch.equal(got, want)
    q, k, v = (t.float() for t in (q, k, v))
    got, _ = cpu_attention.sdpa_short_queries_in_float32(MODULE, q[:, :, :1], k, v, mask[:, :, :1], scaling=0.1)
    want, _ = sdpa_attention_forward(MODULE, q[:, :, :1], k, v, mask[:, :, :1], scaling=0.1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("setting, cpu, name", [("float32", "any", cpu_attention.SDPA_NAME),
                                               ("auto", "avx2", cpu_attention.GROUPED_NAME)])
def test_a_bfloat16_cluster_takes_the_cpus_attention_and_stays_near_transformers(tmp_path, monkeypatch, setting,
                                                                                cpu, name):
    """FIDDLER_CPU_ATTENTION=float32, or auto on a CPU without AVX512-BF16: the coordinator's model attends through
    the float32 path (these prompts are short, so the prompt too) or the grouped one; its logits are about as far
    from the float32 model's as transformers' bfloat16 ones, and from those no farther than bfloat16 is from float32
    (not their bits: the rounding differs)."""
    monkeypatch.setenv("FIDDLER_CPU_ATTENTION", setting)
    if cpu == "avx2":
        monkeypatch.setattr(cpu_attention.compute, "has_avx512_bfloat16", lambda: False)
        monkeypatch.setattr(cpu_attention.compute, "has_amx", lambda: False)
    folder = write_checkpoint("tiny", tmp_path / "tiny-bf16", dtype=torch.bfloat16)
    input_ids, mask = batch(folder)
    with torch.inference_mode():
        want = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)(
            input_ids=input_ids, attention_mask=mask).logits.float()
        truth = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(
            input_ids=input_ids, attention_mask=mask).logits
    with Cluster(folder, workers=1, device="cpu", quiet=True) as cluster:
        assert cluster.coordinator.model.config._attn_implementation == name
        got = cluster.logits(input_ids, mask).float()
        steps = cluster.generate(input_ids[0][mask[0].bool()].tolist(), max_new_tokens=6, ignore_eos=True)
    real = mask.bool()
    bfloat16_error = relative_error(want[real], truth[real])  # 6% on this random model (measured)
    assert relative_error(got[real], truth[real]) <= 1.25 * bfloat16_error
    assert relative_error(got[real], want[real]) <= 1.5 * bfloat16_error
    assert len(steps.token_ids) == 6


def test_one_query_gets_its_mask_so_that_its_heads_attend_grouped():
    """Where transformers would attend with no mask (one sequence, one query), the mask is built, all True, and
    transformers' SDPA then lays the query heads of a key head out as its rows: the exact attention rounded once;
    longer queries keep transformers' choice (no mask: `is_causal`)."""
    shape = dict(batch_size=1, kv_length=70, q_offset=69, device="cpu")
    assert sdpa_mask(q_length=1, **shape) is None
    one = cpu_attention.sdpa_mask_for_one_query(q_length=1, **shape)
    assert one.dtype == torch.bool and one.shape == (1, 1, 1, 70) and one.all()
    prompt = dict(shape, kv_length=5, q_offset=0)
    assert sdpa_mask(q_length=5, **prompt) is None
    assert cpu_attention.sdpa_mask_for_one_query(q_length=5, **prompt) is None
    q, k, v, _ = inputs(1, 1, cached=70, seed=1)
    got, _ = sdpa_attention_forward(MODULE, q, k, v, one, scaling=HEAD_DIM ** -0.5)
    want = exact(q, k, v, one)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert ((got.double() - want).abs() <= want.abs() * 2 ** -7 + 1e-3).all()


def test_by_default_each_cpu_takes_its_faster_attention(monkeypatch):
    monkeypatch.delenv("FIDDLER_CPU_ATTENTION", raising=False)
    expected = {  # (AVX512-BF16, AMX): (not quantized, quantized)
        (False, False): (cpu_attention.GROUPED_NAME, cpu_attention.GROUPED_NAME),
        (True, False): (None, cpu_attention.SDPA_NAME),
        (True, True): (None, None)}
    for (avx512, amx), names in expected.items():
        monkeypatch.setattr(cpu_attention.compute, "has_avx512_bfloat16", lambda avx512=avx512: avx512)
        monkeypatch.setattr(cpu_attention.compute, "has_amx", lambda amx=amx: amx)
        assert (cpu_attention.attention_for(quantized=False), cpu_attention.attention_for(quantized=True)) == names
        monkeypatch.setenv("FIDDLER_CPU_ATTENTION", "float32")
        assert cpu_attention.attention_for(quantized=False) == cpu_attention.SDPA_NAME
        monkeypatch.setenv("FIDDLER_CPU_ATTENTION", "model")
        assert cpu_attention.attention_for(quantized=True) is None
        monkeypatch.delenv("FIDDLER_CPU_ATTENTION")


def test_a_bad_setting_stops_the_start_with_the_fix(checkpoints, monkeypatch):
    monkeypatch.setenv("FIDDLER_CPU_ATTENTION", "fast")
    shm_before, runtime_before = shm_files(), runtime_leftovers()
    with pytest.raises(ValueError, match="FIDDLER_CPU_ATTENTION='fast' is not one of auto, float32, model"):
        Cluster(checkpoints["tiny"], workers=1, device="cpu", quiet=True).start()
    assert shm_files() == shm_before and runtime_leftovers() == runtime_before
