"""The benchmarks' workloads: the models (the embedded demo model, or random weights in a named
shape, written to a folder as a checkpoint would be) and the prompts they are given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _sides import Prompt

# Prompts are cut from this text: the same every run, tokenized as a server would.
SOURCE = Path(__file__).parent / "model_path.py"

SHAPES: dict[str, dict[str, Any]] = {
    # ~34M parameters: the 30-40M random-weight Llama.
    "llama-35m": {
        "kind": "llama",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 16000,
    },
    # The 35M shape in two architectures continuous batching cannot run
    # (benchmarks/engines.py: padded batches against one at a time).
    "gpt-neox-35m": {
        "kind": "gpt_neox",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "intermediate_size": 1376,
        "vocab_size": 16000,
    },
    "opt-35m": {
        "kind": "opt",
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "ffn_dim": 1376,
        "word_embed_proj_dim": 512,
        "vocab_size": 16000,
    },
    # A model whose forward pass costs almost nothing on the CPU: what is left of a step is the
    # host's work, as on a GPU whose step the host bounds (`--models llama-tiny`, the step clock).
    "llama-tiny": {
        "kind": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "intermediate_size": 128,
        "vocab_size": 16000,
    },
    # Qwen2-0.5B's shape, random weights.
    "qwen2-0.5b": {
        "kind": "qwen2",
        "hidden_size": 896,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "intermediate_size": 4864,
        "vocab_size": 151936,
    },
}


def materialise(name: str, folder: Path, dtype: str) -> Path:
    """A model folder for `name`: the demo model itself, or random weights + the demo tokenizer.

    The benchmark's own process runs models too (raw continuous batching, sequential generate): it
    gets the allocator policy of the server's model process, so that their ratios compare steps,
    not malloc's moods (`entity_llm_server.engine.allocator`)."""
    from entity_llm_server import default_model_path
    from entity_llm_server.engine import allocator

    allocator.keep_freed_memory()
    if name == "demo":
        return default_model_path()
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(SHAPES[name])
    kind = shape.pop("kind")
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    # Random weights pick ids across the whole vocabulary: pad the demo's
    # 4,096-token tokenizer to it, so every id decodes to text (as with a real
    # model) and streams carry a message per token rather than only at the end.
    tokenizer.add_tokens([f"<r{i}>" for i in range(shape["vocab_size"] - len(tokenizer))])
    common = {
        "max_position_embeddings": 2048,
        "tie_word_embeddings": True,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    if kind == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig(**shape, **common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape, **common))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **shape, **common))
    if dtype != "auto":
        model = model.to(getattr(torch, dtype))
    target = folder / name
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    params = sum(p.numel() for p in model.parameters())
    print(f"# {name}: {params / 1e6:.1f}M parameters (random weights)")
    return target


def prompts(tokenizer: Any, count: int, length: int) -> list[Prompt]:
    """`count` distinct prompts of about `length` tokens, each with the ids the server makes of its text.

    The server encodes a prompt as `tokenizer(text)` does (with the start
    token); the in-process sides get exactly those ids.
    """
    source = tokenizer(SOURCE.read_text() * 4, add_special_tokens=False)["input_ids"]
    specials = len(tokenizer("")["input_ids"])
    texts = [tokenizer.decode(source[i * 7 : i * 7 + length - specials]) for i in range(count)]
    return [Prompt(text, list(tokenizer(text)["input_ids"])) for text in texts]


def shared_prompts(tokenizer: Any, count: int, prefix: int, length: int, salt: int) -> list[Prompt]:
    """`count` prompts that begin with the same `prefix` tokens and end with about `length` of their own,
    marked with `salt` right after the prefix (so no two rounds share more than the prefix)."""
    source = tokenizer(SOURCE.read_text() * 4, add_special_tokens=False)["input_ids"]
    head = tokenizer.decode(source[-prefix:])
    tails = [f" [{salt}.{i}] " + tokenizer.decode(source[i * 7 : i * 7 + length]) for i in range(count)]
    return [Prompt(head + tail, list(tokenizer(head + tail)["input_ids"])) for tail in tails]
