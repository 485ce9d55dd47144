"""Tiny random-weight causal LMs of many transformers architectures, built by the tests.

Each shares the embedded demo model's tokenizer (4,096 ids), so prompts and
detokenizing work the same everywhere; weights are random with a fixed seed,
a few hundred thousand parameters each. `EXPECTED` says which engine
`--engine auto` must choose: transformers 5.24's continuous batching fails on
five of them after loading and warming up (what the start-up probe is for).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Per architecture: the config's own names for a 2-layer, 64-wide model.
_SIZES: dict[str, dict[str, Any]] = {
    "llama": {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128},
    "gpt_neox": {"num_attention_heads": 4, "intermediate_size": 128},
    "opt": {"num_attention_heads": 4, "ffn_dim": 128, "word_embed_proj_dim": 64},
    "bloom": {"n_head": 4, "n_layer": 2},
    "falcon": {"num_attention_heads": 4},
    "stablelm": {"num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 128},
}

# What `--engine auto` serves each with.
EXPECTED = {
    "llama": "batching",
    "gpt_neox": "sequential",
    "opt": "sequential",
    "bloom": "sequential",
    "falcon": "sequential",
    "stablelm": "sequential",
}
# The class name each loads as (the start-up message names it).
CLASSES = {
    "llama": "LlamaForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "opt": "OPTForCausalLM",
    "bloom": "BloomForCausalLM",
    "falcon": "FalconForCausalLM",
    "stablelm": "StableLmForCausalLM",
}


def build(kind: str, folder: Path) -> Path:
    """Write a tiny random-weight model of `kind` (a transformers model_type) and the demo tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from entity_llm_server import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    sizes = {"hidden_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 256, **_SIZES[kind]}
    if kind == "bloom":  # its config has no num_hidden_layers or max_position_embeddings
        sizes = {k: v for k, v in sizes.items() if k not in ("num_hidden_layers", "max_position_embeddings")}
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


def generate_ids(folder: Path, prompt: str, max_new_tokens: int) -> tuple[int, ...]:
    """The greedy ids plain `model.generate` gives for `prompt` (the reference every engine must match)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tuple(int(i) for i in out[0, ids["input_ids"].shape[1] :])
