"""Tiny random-weight causal LMs of many transformers architectures, built by the tests.

Each shares the embedded demo model's tokenizer (4,096 ids), so prompts and
detokenizing work the same everywhere; weights are random with a fixed seed,
a few hundred thousand parameters each. `EXPECTED` says which engine
`--engine auto` must choose: transformers 5.24's continuous batching fails on
five of them after loading and warming up (what the start-up probe is for).
A model CB would run wrongly is caught too: a GPT-2 config given a key-value
head count it does not use fails the probe (the paged cache is sized by it).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# A 2-layer, 64-wide model in each config's own terms: these names are
# mapped by every config's attribute_map; where an architecture has no
# grouped-query attention, it gets no key-value head count (None drops it).
_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 256,
}
_OVERRIDES: dict[str, dict[str, Any]] = {
    "qwen3": {"head_dim": 16},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "gpt2": {"num_key_value_heads": None},
    "gptj": {"num_key_value_heads": None, "rotary_dim": 8},
    "gpt_neox": {"num_key_value_heads": None},
    "opt": {"num_key_value_heads": None, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "bloom": {"num_key_value_heads": None},
    "falcon": {"num_key_value_heads": None},
    "stablelm": {"num_key_value_heads": 4},
}

# What `--engine auto` serves each with, and the class each loads as (the
# start-up message names it). Continuous batching in transformers 5.24 runs
# the first thirteen; the last five load, warm up, and fail every request.
EXPECTED = {
    "llama": ("batching", "LlamaForCausalLM"),
    "qwen2": ("batching", "Qwen2ForCausalLM"),
    "qwen3": ("batching", "Qwen3ForCausalLM"),
    "mistral": ("batching", "MistralForCausalLM"),
    "mixtral": ("batching", "MixtralForCausalLM"),
    "phi": ("batching", "PhiForCausalLM"),
    "phi3": ("batching", "Phi3ForCausalLM"),
    "gemma2": ("batching", "Gemma2ForCausalLM"),
    "gemma3_text": ("batching", "Gemma3ForCausalLM"),
    "granite": ("batching", "GraniteForCausalLM"),
    "olmo2": ("batching", "Olmo2ForCausalLM"),
    "gpt2": ("batching", "GPT2LMHeadModel"),
    "gptj": ("batching", "GPTJForCausalLM"),
    "gpt_neox": ("padded", "GPTNeoXForCausalLM"),
    "opt": ("padded", "OPTForCausalLM"),
    "bloom": ("padded", "BloomForCausalLM"),
    "falcon": ("padded", "FalconForCausalLM"),
    "stablelm": ("padded", "StableLmForCausalLM"),
}


def build(kind: str, folder: Path) -> Path:
    """Write a tiny random-weight model of `kind` (a transformers model_type) and the demo tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from entity_llm_server import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    sizes = {k: v for k, v in {**_BASE, **_OVERRIDES.get(kind, {})}.items() if v is not None}
    config = AutoConfig.for_model(
        kind,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=4)
def _reference(folder: Path, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return tokenizer, AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=trust_remote_code).eval()


def generate_ids(folder: Path, prompt: str, max_new_tokens: int, *, trust_remote_code: bool = False) -> tuple[int, ...]:
    """The greedy ids plain `model.generate` gives for `prompt` (the reference every engine must match)."""
    import torch

    tokenizer, model = _reference(folder, trust_remote_code)
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tuple(int(i) for i in out[0, ids["input_ids"].shape[1] :])


_CONFIGURATION = """
from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tiny-custom"
"""
_MODELING = """
from transformers import LlamaForCausalLM

from .configuration_tiny_custom import TinyCustomConfig


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
"""


def build_remote_code(folder: Path) -> Path:
    """A model whose architecture is code in its own folder (`auto_map`), as hub models ship it:
    a Llama under another name, which transformers loads only with trust_remote_code."""
    import json

    build("llama", folder)
    (folder / "configuration_tiny_custom.py").write_text(_CONFIGURATION)
    (folder / "modeling_tiny_custom.py").write_text(_MODELING)
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model_type"] = "tiny-custom"
    config["architectures"] = ["TinyCustomForCausalLM"]
    config["auto_map"] = {
        "AutoConfig": "configuration_tiny_custom.TinyCustomConfig",
        "AutoModelForCausalLM": "modeling_tiny_custom.TinyCustomForCausalLM",
    }
    path.write_text(json.dumps(config, indent=2))
    return folder


def build_sentencepiece_only(folder: Path) -> Path:
    """A tiny Llama whose tokenizer is only a SentencePiece model (tokenizer.model, no tokenizer.json),
    as older hub models ship it; trained here with the sentencepiece package."""
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder.parent / f"{folder.name}-corpus.txt"
    lines = ["def f(x):", "    return x + 1", "import os", "class Parser:", "for i in range(10):", "# Copyright"]
    corpus.write_text("\n".join(lines * 40) + "\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=120,
        model_type="bpe",
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}'
    )
    config = LlamaConfig(vocab_size=120, bos_token_id=1, eos_token_id=2, **{**_BASE, "num_key_value_heads": 2})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
