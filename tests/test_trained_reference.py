"""The trained reference model's pipeline end to end, with a training of seconds: benchmarks/train_tiny.py trains a
Mixtral-shaped model on the standard library's sources and caches it as a normal checkpoint, and
benchmarks/quant_accuracy.py measures it on its held-out modules, through transformers and through real clusters."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from fiddler_moe.benchmarks import quant_accuracy, train_tiny

# Small enough to train two steps in seconds; sizes in whole blocks of 32 for --quantize.
PLAN = train_tiny.TrainingPlan(minutes=1, max_steps=2, vocab_size=320, hidden_size=32, intermediate_size=64,
                               num_layers=2, num_experts=4, num_heads=2, num_kv_heads=1, context=64, batch=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FIDDLER_CACHE", str(cache))
        folder = train_tiny.trained_checkpoint(PLAN, log=lambda line: None)
        assert folder.is_relative_to(cache / "trained")
        assert train_tiny.trained_checkpoint(PLAN, log=pytest.fail) == folder  # cached: not trained again
    return folder


def test_the_model_trains_on_the_standard_library_and_saves_as_a_normal_checkpoint(trained):
    record = json.loads((trained / "training.json").read_text())
    assert record["steps"] == 2 and record["tokens_seen"] == 2 * PLAN.batch * PLAN.context
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_files, held_out = train_tiny.split(train_tiny.corpus_files(), PLAN.held_out_every)
    assert record["held_out"] == [f.name for f in held_out] and not set(held_out) & set(train_files)
    assert all((stdlib / name).is_file() for name in record["held_out"])
    model = AutoModelForCausalLM.from_pretrained(trained)
    assert model.config.model_type == "mixtral" and model.config.num_local_experts == PLAN.num_experts
    ids = train_tiny.held_out_ids(trained, 300, PLAN.context)
    assert ids.shape == (4, PLAN.context) and int(ids.max()) < PLAN.vocab_size


def test_the_accuracy_bench_measures_each_format_on_held_out_text_and_the_cluster_agrees(trained, tmp_path):
    out = tmp_path / "accuracy.json"
    results = quant_accuracy.main(["--model", str(trained), "--tokens", "256", "--context", "64", "--cluster",
                                   "--out", str(out)])
    assert json.loads(out.read_text())["formats"].keys() == {"none", "int8", "int4"}
    assert results["text"] == "held-out standard library modules" and results["tokens"] == 256
    formats = results["formats"]
    for name, r in formats.items():
        # the cluster computes the reference's function: the same perplexity, logits within float32 rounding
        assert r["cluster"]["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5), name
        assert r["cluster"]["max_logit_difference"] < 1e-3, name
    assert formats["none"]["perplexity"] == results["float"]["perplexity"]
    assert 0 < formats["int8"]["expert_relative_error"]["mean"] < formats["int4"]["expert_relative_error"]["mean"]
    assert 0 <= formats["int8"]["kl_nats"]["mean"] < formats["int4"]["kl_nats"]["mean"]
