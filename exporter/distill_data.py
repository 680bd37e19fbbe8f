"""Self-distillation data: the target's own greedy continuations of prompts made from local text.

Default corpus: Python sources and installed packages' documentation found on this machine (no
network). The target answers chat prompts built from corpus snippets; the drafters then learn to
predict what the target predicts (labels come from the target, never from the raw text).
"""
from __future__ import annotations

import random
import re
import sys
import sysconfig
from pathlib import Path

import torch

from treespec.errors import InputError

TEXT_SUFFIXES = (".py", ".md", ".rst", ".txt")
SNIPPET_TEMPLATES = (
    "Explain the following in simple terms:\n\n{snippet}",
    "Summarize this text in a few sentences:\n\n{snippet}",
    "Explain what this code does:\n\n{snippet}",
    "Rewrite the following so that it is easier to read:\n\n{snippet}",
    "Give three key points from this text:\n\n{snippet}",
    "Extract the names of functions and classes mentioned here:\n\n{snippet}",
)
# Topic words from the corpus seed everyday assistant requests, so the data covers questions,
# lists, stories, advice, maths and code, not only text about text.
TOPIC_TEMPLATES = (
    "What is {a}? Explain in a short paragraph.",
    "Explain {a} to a ten-year-old.",
    "Give three tips for working with {a}.",
    "Write a short story about {a} and {b}.",
    "Write a poem about {a}.",
    "List five facts about {a}, one per line.",
    "What is the difference between {a} and {b}?",
    "Write a Python function that works with {a}, with a docstring.",
    "Write a SQL query about {a} and explain it.",
    "I need advice: how should I prepare for a meeting about {a}?",
    "What is {n} times {m}? Show the steps.",
    "Write an email to a colleague about {a}.",
    "Give the pros and cons of {a}.",
)


def default_corpus_dirs() -> list[Path]:
    paths = {Path(sysconfig.get_paths()["stdlib"]), Path(sysconfig.get_paths()["purelib"])}
    return sorted(p for p in paths if p.is_dir())


def read_corpus(dirs: list[Path], max_bytes: int, seed: int) -> list[str]:
    """Text files under `dirs` (sorted, then shuffled with `seed`), up to `max_bytes` in total."""
    files = []
    for d in dirs:
        if not d.is_dir():
            raise InputError(f"corpus folder {d} does not exist")
        files += [p for p in sorted(d.rglob("*")) if p.suffix in TEXT_SUFFIXES and p.is_file()]
    if not files:
        raise InputError(f"no text files ({', '.join(TEXT_SUFFIXES)}) under {', '.join(map(str, dirs))}")
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 200:
            continue
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    return texts


def _topic_words(texts: list[str], rng: random.Random, limit: int = 20000) -> list[str]:
    words = set()
    for text in texts[:2000]:
        words.update(w.lower() for w in re.findall(r"\b[A-Za-z]{5,14}\b", text[:5000]))
        if len(words) > limit:
            break
    return sorted(words)


def make_prompts(texts: list[str], count: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    words = _topic_words(texts, rng)
    prompts = []
    for _ in range(count):
        if rng.random() < 0.35:
            text = rng.choice(texts)
            start = rng.randrange(0, max(1, len(text) - 400))
            snippet = text[start:start + rng.randint(150, 400)].strip()
            content = rng.choice(SNIPPET_TEMPLATES).format(snippet=snippet)
        else:
            content = rng.choice(TOPIC_TEMPLATES).format(a=rng.choice(words), b=rng.choice(words),
                                                         n=rng.randint(2, 99), m=rng.randint(2, 99))
        prompts.append([{"role": "user", "content": content}])
    return prompts


@torch.no_grad()
def generate_sequences(model, tokenizer, prompts: list[list[dict]], new_tokens: int, batch_size: int,
                       max_prompt_tokens: int, device: str, progress=None) -> list[list[int]]:
    """prompt + the target's greedy continuation, as token ids, one list per prompt."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sequences = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True) for p in chunk]
        ids = [list(i["input_ids"] if hasattr(i, "keys") else i)[-max_prompt_tokens:] for i in ids]
        width = max(len(i) for i in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=device)
        attention = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
        for row, prompt_ids in zip(out.tolist(), ids):
            generated = row[width:]
            eos = [i for i, t in enumerate(generated) if t == tokenizer.eos_token_id]
            sequences.append(prompt_ids + generated[: eos[0] + 1 if eos else len(generated)])
        if progress:
            progress(len(chunk))
    return sequences


def corpus_sequences(tokenizer, texts: list[str], count: int, length: int, seed: int) -> list[list[int]]:
    """Plain corpus windows (teacher-forced; labels still come from the target)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        ids = tokenizer.encode(rng.choice(texts))
        if len(ids) > length:
            start = rng.randrange(0, len(ids) - length)
            ids = ids[start:start + length]
        out.append(ids)
    return out


def pack(sequences: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] int32 token ids (right padded) and [N] lengths."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.int32)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.int32)
    return ids, torch.tensor([len(s) for s in sequences], dtype=torch.int32)


def log(message: str) -> None:
    print(f"[treespec train] {message}", file=sys.stderr, flush=True)
