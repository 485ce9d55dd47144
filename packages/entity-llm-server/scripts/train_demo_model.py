#!/usr/bin/env python
"""Train the tiny demo model that ships inside ``entity_llm_server``.

The model is a small Llama-architecture causal LM trained for a few minutes on
CPU, on the Python standard library's own source code (so no downloads are
needed). It exists so the server has something real to load in tests and
demos; it writes plausible-looking Python, nothing more.

Usage:  nox -s train  (or: python packages/entity-llm-server/scripts/train_demo_model.py [--out DIR] [--seed 0])
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import textwrap
import time
from pathlib import Path
from typing import Any

DEFAULT_OUT = "packages/entity-llm-server/src/entity_llm_server/models/demo"
EOS = "<|endoftext|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Every turn starts with a role marker; assistant turns end with EOS so the
# model learns where to stop. Unknown roles are rendered as user turns. The
# leading BOS mirrors training, where every document follows an EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% else %}<|user|>\n{{ message['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Not representative source: generated tables, caches, bundled docs ...
SKIP_DIRS = {"site-packages", "dist-packages", "lib-dynload", "__pycache__", "encodings", "pydoc_data"}
# ... and test suites, IDLE and demos, which are not typical library code.
SKIP_DIRS |= {"test", "tests", "idle_test", "idlelib", "turtledemo", "ensurepip"}
SAMPLE_PROMPTS = ["def fibonacci(n):", "import os\n"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (model + tokenizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps")
    p.add_argument("--max-minutes", type=float, default=13.0, help="cap on training wall time (see main loop)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=120)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--max-corpus-mb", type=float, default=16.0, help="cap on corpus size")
    p.add_argument("--val-percent", type=float, default=3.0, help="share of files held out")
    p.add_argument("--chat-fraction", type=float, default=0.15, help="share of bytes for chat examples")
    # auto = bf16 autocast where the CPU has native bf16, else fp32
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--threads", type=int, default=2)
    # torch.compile fuses the many small ops of a tiny model: ~1.6x faster after ~1 min of compiling.
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-every", type=int, default=400)
    return p.parse_args(argv)


def collect_files(max_bytes: int) -> list[tuple[str, str]]:
    """Return (relative path, text) for stdlib modules, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(("test", "config-"))]
        paths += [
            Path(dirpath) / f for f in filenames if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata"))
        ]
    docs, total = [], 0
    for path in sorted(paths, key=lambda q: q.relative_to(root).as_posix()):
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text or total + len(text) > max_bytes:
            continue
        docs.append((path.relative_to(root).as_posix(), text))
        total += len(text)
    return docs


def is_validation(rel_path: str, percent: float) -> bool:
    # Hash of the path, not a random draw: the split stays put if files are added.
    return int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) % 10000 < percent * 100


def function_examples(source: str) -> list[tuple[str, str, str]]:
    """(name, docstring summary, dedented source) for documented functions."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()  # sliced by line numbers; get_source_segment is quadratic
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno:
            doc = (ast.get_docstring(node) or "").strip()
            seg = "\n".join(lines[node.lineno - 1 : node.end_lineno])
            if doc and len(seg) < 1500:
                out.append((node.name, doc.splitlines()[0].strip(), textwrap.dedent(seg)))
    return out


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()  # undoes the byte->unicode map, so any UTF-8 round-trips
    # All 256 byte symbols are in the vocabulary from the start, so nothing is ever unknown.
    alphabet, specials = pre_tokenizers.ByteLevel.alphabet(), [EOS, *ROLE_TOKENS]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Prompts start like training documents do: right after an <|endoftext|>.
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    named = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "extra_special_tokens": ROLE_TOKENS}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **named)  # type: ignore[no-untyped-call]
    hf.chat_template = CHAT_TEMPLATE
    return hf


def token_stream(tokenizer: Any, docs: list[str]) -> Any:
    """Concatenate documents, each preceded by EOS, into one 1-D id tensor."""
    import torch

    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.append(eos)
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def evaluate(model: Any, stream: Any, seq_len: int, max_windows: int, amp: bool) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out stream."""
    import torch

    model.eval()
    n = min(max_windows, (len(stream) - 1) // seq_len)
    total, count = 0.0, 0
    for i in range(0, n, 8):
        rows = torch.stack([stream[j * seq_len : (j + 1) * seq_len] for j in range(i, min(i + 8, n))])
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=rows, labels=rows).loss
        total += loss.item() * rows.numel()
        count += rows.numel()
    model.train()
    return total / count


def complete(model: Any, tokenizer: Any, prompt: str, seed: int | None = None) -> str:
    """Greedy continuation, or a seeded temperature-0.7 / top-40 sample when `seed` is given."""
    import torch

    # Chat-rendered prompts already carry BOS from the template.
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=not prompt.startswith(EOS))
    mode: dict[str, Any] = {"do_sample": False}
    if seed is not None:
        mode = {"do_sample": True, "temperature": 0.7, "top_k": 40}
        torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=64, **mode)
    return str(tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # bf16 autocast is ~1.4x faster where the CPU has native bf16 (AVX512-BF16/AMX);
    # elsewhere it would be emulated and slower, so fall back to fp32 there.
    has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    amp = args.precision == "bf16" or (args.precision == "auto" and has_bf16)

    # ---- corpus -------------------------------------------------------------
    files = collect_files(int(args.max_corpus_mb * 1e6))
    train_files = [(p, t) for p, t in files if not is_validation(p, args.val_percent)]
    val_files = [(p, t) for p, t in files if is_validation(p, args.val_percent)]
    code_docs = [t for _, t in train_files]
    examples = [ex for _, t in train_files for ex in function_examples(t)]
    rng.shuffle(examples)  # seeded: which functions become chat examples
    code_bytes = sum(map(len, code_docs))
    print(
        f"corpus: {len(train_files)} train files ({code_bytes / 1e6:.1f} MB), "
        f"{len(val_files)} held out, {len(examples)} documented functions",
        flush=True,
    )

    # ---- tokenizer ----------------------------------------------------------
    tokenizer = train_tokenizer(code_docs, args.vocab_size)
    # Chat samples teach the template: user names a function, assistant writes it.
    chat_docs, chat_bytes = [], 0
    for name, summary, src in examples:
        if chat_bytes > args.chat_fraction * code_bytes:
            break
        msgs = [
            {"role": "user", "content": f"Write a Python function `{name}`: {summary}"},
            {"role": "assistant", "content": src},
        ]
        text = tokenizer.apply_chat_template(msgs, tokenize=False)
        chat_docs.append(text.removeprefix(EOS))  # token_stream adds the separator itself
        chat_bytes += len(chat_docs[-1])
    docs = code_docs + chat_docs
    rng.shuffle(docs)
    train_ids = token_stream(tokenizer, docs)
    val_texts = [t for _, t in val_files]
    val_ids = token_stream(tokenizer, val_texts)
    val_bytes = sum(len(t.encode()) for t in val_texts)
    print(
        f"tokens: train {len(train_ids):,} ({len(chat_docs)} chat docs), held-out {len(val_ids):,}; "
        f"{val_bytes / len(val_ids):.2f} bytes/token; setup {time.time() - t0:.0f}s",
        flush=True,
    )

    # ---- model --------------------------------------------------------------
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; bf16 autocast={amp}", flush=True)

    # No weight decay on norms/embeddings: standard practice, helps tiny models.
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))

    peak, warmup = float(args.lr), int(args.warmup)

    def lr_at(step: int, total: int) -> float:  # linear warmup, cosine decay to 10 % of peak
        if step < warmup:
            return peak * (step + 1) / warmup
        frac = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)  # window sampling independent of model init
    cap_s, total, history, ema = args.max_minutes * 60, args.steps, [], 0.0
    forward = torch.compile(model) if args.compile else model
    train_start = first_done = time.time()
    model.train()
    step = 0
    while step < total:
        # On a slow or busy machine, shorten the schedule instead of being cut off
        # mid-way with a high learning rate; a fast machine never takes this branch,
        # so there the result depends on the seed alone. Pace is measured from
        # the end of step 0, which also pays for compilation.
        per_step = (time.time() - first_done) / max(1, step - 1)
        if step >= 100 and step % 20 == 0 and (first_done - train_start) + per_step * (total - 1) > cap_s:
            total = max(step + 1, 1 + int((cap_s - (first_done - train_start)) / per_step))
            print(f"  behind pace: schedule shortened to {total} steps", flush=True)
        starts = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            try:
                loss = forward(input_ids=batch, labels=batch).loss
            except Exception as exc:  # e.g. no C++ compiler for inductor: train eagerly instead
                if forward is model:
                    raise
                print(f"torch.compile failed ({type(exc).__name__}); continuing without it", flush=True)
                forward = model
                loss = forward(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss.item() if step == 0 else 0.95 * ema + 0.05 * loss.item()
        if step % 20 == 0:
            el = time.time() - train_start
            print(
                f"step {step:5d}  loss {ema:.3f}  lr {lr_at(step, total):.2e}  {el:6.0f}s  "
                f"{(step + 1) * batch.numel() / el:,.0f} tok/s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            v = evaluate(model, val_ids, args.seq_len, 24, amp)
            history.append({"step": step, "train_loss": round(ema, 4), "val_loss": round(v, 4)})
            print(f"  eval step {step}: held-out loss {v:.3f}", flush=True)
        if step == 0:
            first_done = time.time()
        step += 1
    train_seconds = time.time() - train_start

    # ---- evaluate, sample, save ---------------------------------------------
    val_loss = evaluate(model, val_ids, args.seq_len, 10**9, False)  # fp32 = what users will run
    bits_per_byte = val_loss / math.log(2) * len(val_ids) / val_bytes  # tokenizer-independent measure
    ask = [{"role": "user", "content": "Write a Python function `is_even`: Return True if n is even."}]
    prompts = [*SAMPLE_PROMPTS, tokenizer.apply_chat_template(ask, tokenize=False, add_generation_prompt=True)]
    samples = [
        {"prompt": p, "greedy": complete(model, tokenizer, p), "sampled": complete(model, tokenizer, p, args.seed)}
        for p in prompts
    ]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    model.generation_config = GenerationConfig(**ids)  # type: ignore[no-untyped-call]  # generate() stops at EOS
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for f in out.iterdir():  # safetensors writes 0600; the package data must be world-readable
        f.chmod(0o644)
    files_bytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file() and f.name != "training_report.json")
    report: dict[str, Any] = {
        "seed": args.seed,
        "args": vars(args),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "parameters": n_params,
        "model_files_bytes": files_bytes,
        "training": {"steps": total, "schedule_shortened": total < args.steps, "bf16_autocast": amp},
        "corpus": {"train_files": len(train_files), "train_tokens": len(train_ids), "chat_docs": len(chat_docs)},
        "heldout": {"files": len(val_files), "tokens": len(val_ids), "loss": round(val_loss, 4)},
        "history": history,
        "samples": samples,
    }
    report["heldout"] |= {"perplexity": round(math.exp(val_loss), 3), "bits_per_byte": round(bits_per_byte, 4)}
    report["training"] |= {"tokens_seen": total * args.batch_size * args.seq_len, "seconds": round(train_seconds)}
    report["total_seconds"] = round(time.time() - t0)
    (out / "training_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")

    print(f"\nheld-out loss {val_loss:.4f} nats/token (ppl {math.exp(val_loss):.2f}, {bits_per_byte:.3f} bits/byte)")
    print(f"parameters {n_params:,}; files {files_bytes / 1e6:.2f} MB; total {time.time() - t0:.0f}s")
    for sample in samples:
        print(f"--- prompt {sample['prompt']!r}\n[greedy]\n{sample['greedy']}\n[sampled]\n{sample['sampled']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
