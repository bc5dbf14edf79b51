"""Deterministic random-weight MoE checkpoints in the Hugging Face layout.

The built-in model (and every preset here) has RANDOM weights: nothing was trained, so the text it
generates is gibberish. What is real is everything around the weights: the shapes, the routing, the
file layout (written by transformers' own ``save_pretrained``, so the tensors carry the same names as
the published Mixtral / Qwen-MoE checkpoints) and a working byte-level BPE tokenizer with a chat
template. That is what tests, benchmarks and a first ``fiddler run`` need, without a download.

The same preset, seed and dtype always produce byte-identical safetensors files.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from fiddler_moe.host.numa import available_memory_bytes
from fiddler_moe.host.paths import cache_dir


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str  # "mixtral" | "qwen3_moe" | "qwen2_moe" | "gpt_oss"
    hidden_size: int
    intermediate_size: int  # per expert (moe_intermediate_size for the Qwen models)
    num_layers: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int  # tiny presets: the size the embedded text trains the tokenizer to
    shared_expert_intermediate_size: int = 0  # qwen2_moe only
    max_position_embeddings: int = 4096
    sliding_window: int | None = None  # gpt_oss: every other layer attends to this many tokens
    swiglu_limit: float | None = None  # gpt_oss: the experts' clamp


# The embedded text below trains a byte-level BPE to exactly this many tokens with no filler.
TINY_VOCAB = 512

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", "mixtral", 64, 128, 4, 8, 2, 4, 2, TINY_VOCAB),
        Preset("tiny-qwen3-moe", "qwen3_moe", 64, 32, 4, 16, 4, 4, 2, TINY_VOCAB),
        Preset("tiny-qwen2-moe", "qwen2_moe", 64, 32, 4, 8, 2, 4, 2, TINY_VOCAB, shared_expert_intermediate_size=96),
        # A window shorter than the test prompts and a clamp that random weights reach (gpt-oss: 128 and 7.0), so
        # that both are exercised.
        Preset("tiny-gpt-oss", "gpt_oss", 64, 32, 4, 8, 2, 4, 2, TINY_VOCAB, sliding_window=8, swiglu_limit=0.1),
        Preset("mini", "mixtral", 1024, 3584, 8, 8, 2, 16, 4, 32000),
        Preset("small", "mixtral", 2048, 5632, 8, 8, 2, 16, 4, 32000),
        Preset("qwen3-moe-mini", "qwen3_moe", 1024, 512, 8, 64, 8, 16, 4, 32000),
        Preset("mixtral-8x7b", "mixtral", 4096, 14336, 32, 8, 2, 32, 8, 32000, max_position_embeddings=32768),
    )
}

ARCHITECTURES = ("mixtral", "qwen3_moe", "qwen2_moe", "gpt_oss")
BUILTIN_PRESET = "tiny"
# Bump when the bytes written for a preset change, so an old cached built-in model is not reused.
BUILTIN_VERSION = 1
# The published Mixtral-8x7B ships ~5 GB shards; a bound also caps the extra memory the save needs.
DEFAULT_MAX_SHARD_SIZE = "5GB"
INIT_STD = 0.02  # small enough that 32 layers of random residual updates stay finite in bfloat16

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD]  # ids 0..3, the same bos=1 / eos=2 as Mixtral's tokenizer
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Training text for the tokenizer, written for this project (no third-party text, so no licence question).
# Editing it changes every tokenizer and so every checkpoint: bump BUILTIN_VERSION if you do.
TRAINING_TEXT = """\
A mixture of experts is a neural network that keeps many small feed-forward blocks, called experts, \
and a router that picks a few of them for every token. The router is a single linear layer: it scores \
each expert, keeps the top two or the top eight, and mixes their outputs with the softmax of those scores. \
Because only a few experts run for any one token, the model can hold far more parameters than it spends \
work on, and that is the whole point of the design.

The trouble is memory. A model such as Mixtral keeps eight experts in each of its thirty-two layers, and \
the experts hold almost all of its weights. Those weights do not fit in the memory of a single graphics \
card, yet the card is where the attention layers and the router want to run.

Fiddler takes a plain view of the problem. Moving the weights of a cold expert across the bus costs more \
time than computing that expert where it already lives, because one token needs only a small vector of \
activations. So the hot experts stay on the device, the cold experts stay in host memory, and for a cold \
expert the host receives the hidden state, runs the expert on its own cores, and sends back the result. \
The activations are a few kilobytes; the weights are hundreds of megabytes.

This checkpoint was not trained. Its weights are random numbers drawn from a fixed seed, so the text it \
writes is gibberish, but its shapes, its routing and its files are real, and the same seed always gives \
the same bytes. That makes it good for tests and poor for poetry.

Once upon a time a miller lived by a river with his three daughters. The eldest could count every sack \
of grain in the barn, the second could mend any wheel that broke, and the youngest could tell, by the \
sound of the water alone, when a storm was coming from the hills. One autumn evening the river turned \
brown and loud, and the miller asked his daughters what they should do. The eldest said to carry the \
grain up to the loft, the second said to lock the great wheel, and the youngest said to do both at once \
and then to wake the village. They did as she said, and in the morning the whole valley was under water, \
but not one sack and not one neighbour was lost.

Questions and answers: What is a token? A small piece of text, such as a word or part of a word. What is \
an expert? A feed-forward block with its own weights. Which experts run? The ones the router likes best. \
Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear here so that digits are seen; \
so do punctuation marks like (parentheses), [brackets], {braces}, quotes "like these", 'and these', \
colons: semicolons; dashes - and slashes / too!
"""


def builtin_model_path() -> Path:
    """The built-in tiny model (random weights, float32, seed 0); written on first use, then reused."""
    return write_checkpoint(BUILTIN_PRESET, cache_dir() / f"builtin-{BUILTIN_PRESET}-v{BUILTIN_VERSION}")


def _resolve(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        found = preset
    elif preset in PRESETS:
        found = PRESETS[preset]
    else:
        raise ValueError(f"Unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}.")
    if found.architecture not in ARCHITECTURES:
        raise ValueError(f"Preset {found.name!r} has architecture {found.architecture!r}; use one of {ARCHITECTURES}.")
    if found.hidden_size % found.num_heads or found.num_heads % found.num_kv_heads:
        raise ValueError(f"Preset {found.name!r}: hidden_size must divide by num_heads, and num_heads by num_kv_heads.")
    return found


def build_config(preset: Preset, dtype: torch.dtype) -> transformers.PreTrainedConfig:
    """The transformers config for a preset, with token ids matching the tokenizer built here."""
    preset = _resolve(preset)
    common = dict(
        vocab_size=preset.vocab_size,
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        num_experts_per_tok=preset.top_k,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD),
        dtype=dtype,
    )
    head_dim = preset.hidden_size // preset.num_heads
    if preset.architecture == "mixtral":
        return transformers.MixtralConfig(
            **common, intermediate_size=preset.intermediate_size, num_local_experts=preset.num_experts, head_dim=head_dim
        )
    if preset.architecture == "qwen3_moe":
        # intermediate_size is the dense MLP of mlp_only_layers (none here); set it the way Qwen3-30B-A3B does.
        return transformers.Qwen3MoeConfig(
            **common,
            intermediate_size=preset.intermediate_size * preset.top_k,
            moe_intermediate_size=preset.intermediate_size,
            num_experts=preset.num_experts,
            head_dim=head_dim,
        )
    if preset.architecture == "gpt_oss":
        limit = {} if preset.swiglu_limit is None else {"swiglu_limit": preset.swiglu_limit}
        return transformers.GptOssConfig(
            **common, intermediate_size=preset.intermediate_size, num_local_experts=preset.num_experts,
            head_dim=head_dim, sliding_window=preset.sliding_window or 128, **limit,
        )
    if not preset.shared_expert_intermediate_size:
        raise ValueError(f"Preset {preset.name!r} is qwen2_moe, which needs shared_expert_intermediate_size > 0.")
    return transformers.Qwen2MoeConfig(
        **common,
        intermediate_size=preset.shared_expert_intermediate_size,
        moe_intermediate_size=preset.intermediate_size,
        shared_expert_intermediate_size=preset.shared_expert_intermediate_size,
        num_experts=preset.num_experts,
    )


def estimated_bytes(preset: Preset, dtype: torch.dtype) -> int:
    """Bytes of all parameters in the checkpoint, counted from the shapes without building anything."""
    p = _resolve(preset)
    h, head_dim = p.hidden_size, p.hidden_size // p.num_heads
    q, kv = p.num_heads * head_dim, p.num_kv_heads * head_dim
    attention = h * q + 2 * h * kv + q * h
    if p.architecture == "qwen2_moe":
        attention += q + 2 * kv  # q/k/v biases
    if p.architecture == "qwen3_moe":
        attention += 2 * head_dim  # q_norm, k_norm
    if p.architecture == "gpt_oss":
        attention += 2 * q + 2 * kv + p.num_heads  # q/k/v/o biases, attention sinks
    moe = p.num_experts * h + p.num_experts * 3 * h * p.intermediate_size  # router + experts
    if p.architecture == "gpt_oss":
        moe += p.num_experts + p.num_experts * (2 * p.intermediate_size + h)  # router and expert biases
    if p.architecture == "qwen2_moe":
        moe += 3 * h * p.shared_expert_intermediate_size + h  # shared expert + its sigmoid gate
    per_layer = attention + moe + 2 * h  # two RMSNorms
    params = 2 * p.vocab_size * h + p.num_layers * per_layer + h  # embeddings, lm_head, final norm
    return params * torch.empty((), dtype=dtype).element_size()


def build_tokenizer(vocab_size: int, model_max_length: int = 4096,
                    texts: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TRAINING_TEXT (or on `texts`), padded with filler tokens to exactly vocab_size.

    Byte level means every UTF-8 string encodes and decodes back unchanged, with no <unk>. The text
    only supports a few hundred merges, so large vocabularies get unreachable filler entries
    ("<filler_00890>", ...) appended to the BPE vocab; they decode to their own name.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT] if texts is None else texts, trainer=trainer)
    trained = tok.get_vocab_size()
    if trained < vocab_size:
        # Extending the BPE vocab (not added tokens) keeps tokenizer.json small and encoding unaffected.
        spec = json.loads(tok.to_str())
        spec["model"]["vocab"].update({f"<filler_{i:05d}>": i for i in range(trained, vocab_size)})
        tok = Tokenizer.from_str(json.dumps(spec))
    if tok.get_vocab_size() != vocab_size:
        raise ValueError(f"Cannot build a tokenizer of {vocab_size} tokens (got {tok.get_vocab_size()}); "
                         "use at least 260.")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def free_disk_bytes(folder: Path) -> int:
    """Free space on the filesystem that will hold `folder` (its nearest existing ancestor)."""
    existing = Path(folder)
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _size_to_bytes(size: str | int) -> int:
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size, re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {size!r} is not a size like '5GB', '500MB' or '100KiB'.")
    number, unit, binary = match.groups()
    power = "KMGT".index(unit.upper()) + 1 if unit else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def _check_resources(preset: Preset, dtype: torch.dtype, folder: Path, max_shard_size: str | int) -> None:
    """Refuse before allocating anything if the model cannot be built in memory or written to disk."""
    weights = estimated_bytes(preset, dtype)
    # The whole model lives in memory while it is saved, and each shard is copied once more as it is
    # written (the fused expert tensors are split back into per-expert ones); 512 MiB covers the runtime.
    need_memory = weights + min(weights, _size_to_bytes(max_shard_size)) + 512 * 2**20
    available = available_memory_bytes()
    if available is not None and available < need_memory:
        raise MemoryError(
            f"Writing preset {preset.name!r} in {dtype} needs about {_gb(need_memory)} of free memory "
            f"({_gb(weights)} of weights plus the save buffer), but only {_gb(available)} is available. "
            f"Use a smaller preset (estimated_bytes() gives each one's size), a 2-byte dtype such as torch.bfloat16, "
            f"a smaller max_shard_size, or a machine with more memory."
        )
    need_disk = weights + 64 * 2**20  # weights plus tokenizer and configs
    free = free_disk_bytes(folder)
    if free < need_disk:
        raise OSError(
            errno.ENOSPC,
            f"Writing preset {preset.name!r} in {dtype} needs about {_gb(need_disk)} of disk for {folder}, "
            f"but only {_gb(free)} is free there. Free some space or pass another folder (or set FIDDLER_CACHE).",
        )


def _is_complete(folder: Path) -> bool:
    """config.json, tokenizer.json and every safetensors file the index names (or model.safetensors)."""
    if not (folder / "config.json").is_file() or not (folder / "tokenizer.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return (folder / "model.safetensors").is_file()


def _reinit_routers(model: torch.nn.Module, num_experts: int, seed: int) -> None:
    """Routers drawn from N(0, 0.02) under the seed: some transformers versions zero-init the Qwen
    routers, and a zero router sends every token to the same experts, which would hide routing bugs.
    Expert biases (gpt-oss) are drawn too: transformers starts them at zero, which would hide them."""
    generator = torch.Generator().manual_seed(seed)

    def draw(tensor: torch.Tensor) -> None:
        with torch.no_grad():
            tensor.copy_((torch.randn(tensor.shape, generator=generator, dtype=torch.float32) * INIT_STD).to(tensor.dtype))

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if name.endswith((".gate", ".router")) and weight is not None and weight.shape[0] == num_experts:
            draw(weight)
        if name.endswith(".experts"):
            for param_name, param in module.named_parameters(recurse=False):
                if param_name.endswith("_bias"):
                    draw(param)


# gpt-oss's published config.json, less the version it was written with.
MXFP4_QUANTIZATION_CONFIG = {
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
    "quant_method": "mxfp4",
}


def _store_experts_as_mxfp4(folder: Path) -> None:
    """Rewrite each experts' gate_up_proj and down_proj as `_blocks` and `_scales` tensors (experts.mxfp4) and mark
    config.json with gpt-oss's quantization_config: the layout of the published gpt-oss checkpoints, which
    transformers dequantizes when it loads them on a CPU."""
    from safetensors.torch import load_file, save_file

    from fiddler_moe.experts import mxfp4

    renamed: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        for key in [k for k in tensors if k.endswith((".experts.gate_up_proj", ".experts.down_proj"))]:
            blocks, scales = mxfp4.quantize(tensors.pop(key))
            tensors[f"{key}_blocks"], tensors[f"{key}_scales"] = blocks, scales
            renamed[key] = [f"{key}_blocks", f"{key}_scales"]
        save_file(tensors, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        spec = json.loads(index.read_text())
        for key, names in renamed.items():
            file = spec["weight_map"].pop(key)
            spec["weight_map"].update(dict.fromkeys(names, file))
        index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# DeepSeek-V3's published quantization_config; the block size is the writer's.
FP8_QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"}


def _store_weights_as_fp8(folder: Path, block: tuple[int, int]) -> None:
    """Rewrite every linear weight but the embeddings, the head and the routers as float8_e4m3fn beside float32
    block scales `X.weight_scale_inv` (experts.fp8), and mark config.json with DeepSeek-V3's quantization_config
    with weight_block_size `block`: the layout of the FP8 releases (DeepSeek-V3/R1, Qwen3 FP8), which
    transformers dequantizes when it loads them on a CPU."""
    from safetensors.torch import load_file, save_file

    from fiddler_moe.experts import fp8

    config = json.loads((folder / "config.json").read_text())
    experts = next((config[k] for k in ("num_local_experts", "num_experts") if k in config), 0)
    added: dict[str, str] = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        for key in list(tensors):
            w = tensors[key]
            router = key.endswith((".gate.weight", ".router.weight")) and w.shape[0] == experts
            if (w.dim() != 2 or not key.endswith(".weight") or router or "embed" in key or "lm_head" in key
                    or w.shape[0] % block[0] or w.shape[1] % block[1]):
                continue
            tensors[key], tensors[fp8.scale_key(key)] = fp8.quantize(w, block)
            added[fp8.scale_key(key)] = path.name
        save_file(tensors, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        spec = json.loads(index.read_text())
        spec["weight_map"].update(added)
        index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    config["quantization_config"] = {**FP8_QUANTIZATION_CONFIG, "weight_block_size": list(block)}
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fsync_tree(folder: Path) -> None:
    # Without this a power cut after the rename can leave a complete-looking folder of truncated files.
    for path in sorted(folder.iterdir()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    preset: str | Preset,
    folder: Path,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | None = None,
    mxfp4: bool = False,
    fp8_block: tuple[int, int] | None = None,
) -> Path:
    """Write a random-weight checkpoint of `preset` into `folder` and return the folder.

    An existing complete checkpoint is returned as is, whatever preset or seed wrote it. The files are
    built in a temporary sibling folder and renamed into place, so `folder` is either absent or complete,
    and concurrent writers all return a valid folder. `max_shard_size` (default 5GB) goes to
    save_pretrained; below the model size it produces shards plus model.safetensors.index.json.
    `mxfp4` (gpt_oss only) stores the experts' matrices as gpt-oss ships them (`_store_experts_as_mxfp4`);
    `fp8_block` stores the linear weights in FP8 with scales per block of that size, as DeepSeek-V3 and the Qwen3 FP8
    releases ship them (`_store_weights_as_fp8`).
    """
    preset = _resolve(preset)
    if mxfp4 and preset.architecture != "gpt_oss":
        raise ValueError(f"mxfp4 is gpt-oss's expert format; preset {preset.name!r} is {preset.architecture}")
    folder = Path(folder).expanduser().absolute()
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point torch dtype such as torch.bfloat16, not {dtype}.")
    if _is_complete(folder):
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} exists but holds no complete checkpoint; delete it or choose another folder.")
    shard_size = max_shard_size or DEFAULT_MAX_SHARD_SIZE
    _check_resources(preset, dtype, folder, shard_size)

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        tokenizer = build_tokenizer(preset.vocab_size, preset.max_position_embeddings)
        config = build_config(preset, dtype)
        # fork_rng: seed our own draws without disturbing the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _reinit_routers(model, preset.num_experts, seed)
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            do_sample=False,
        )
        model.save_pretrained(staging, max_shard_size=shard_size)
        del model
        if mxfp4:
            _store_experts_as_mxfp4(staging)
        if fp8_block:
            _store_weights_as_fp8(staging, fp8_block)
        tokenizer.save_pretrained(staging)
        _fsync_tree(staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700; the model folder should read like any other
        try:
            os.replace(staging, folder)  # atomic; only succeeds onto an absent or empty folder
        except OSError as error:
            # Another writer won the race: theirs is as good as ours.
            if error.errno in (errno.ENOTEMPTY, errno.EEXIST) and _is_complete(folder):
                return folder
            raise
        with contextlib.suppress(OSError):
            _fsync_dir(folder.parent)  # makes the rename itself durable
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = [
    "PRESETS",
    "Preset",
    "build_config",
    "build_tokenizer",
    "builtin_model_path",
    "estimated_bytes",
    "write_checkpoint",
]
