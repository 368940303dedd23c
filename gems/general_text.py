"""General-domain text, as the windows of token ids that null-space bases are estimated from.

The text is a file (``gems.general_corpus``, or wikitext-2 valid from shared data) or, on a fresh
machine without either, the base model's greedy continuations of fixed diverse prompts. Retention
measures drift on greedy continuations of its own prompts as well: both generate through
:func:`greedy_continuations`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

#: Prompts whose greedy continuations by the base model form the general corpus of last resort
#: (a fresh machine without wikitext and no ``gems.general_corpus``). Diverse on purpose:
#: narrative, science, how-to, dialogue, code, lists, history, law, cooking, sport...
GENERATION_PROMPTS: tuple[str, ...] = (
    "Once upon a time, in a small village by the sea,",
    "The theory of general relativity describes gravity as",
    "To bake a simple loaf of bread, you will need",
    "Q: What is the capital of Australia?\nA:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The main causes of the First World War were",
    "Here are five tips for staying productive while working from home:\n1.",
    "Dear hiring manager, I am writing to apply for",
    "The human heart has four chambers, which",
    "In economics, inflation refers to",
    "The football match ended in a draw after",
    "Photosynthesis is the process by which plants",
    "A contract is legally binding when",
    "The following is a conversation between a customer and a shop assistant.\nCustomer:",
    "Mount Everest, the highest mountain on Earth, is located",
    "Machine learning models are trained by",
    "The recipe calls for two cups of flour, one egg and",
    "Shakespeare's play Hamlet tells the story of",
    "To change a flat tyre, first",
    "The history of the printing press begins",
)

SEQ_LEN = 256


@dataclass(frozen=True)
class GeneralCorpus:
    """General-domain text and where it came from (recorded with the run)."""

    texts: list[str]
    source: str


@torch.no_grad()
def greedy_continuations(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                         max_new_tokens: int, pad_id: int, *, bos: bool = False, **options: Any) -> Tensor:
    """The prompts and the model's greedy continuations as token ids, one row per prompt.

    Prompts are tokenized without special tokens (BOS first when ``bos`` and the tokenizer has
    one) and left-padded with ``pad_id``. ``options`` go to ``model.generate`` as given: what they
    leave out stays as the model's generation config has it.
    """
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    if bos and tokenizer.bos_token_id is not None:
        rows = [[tokenizer.bos_token_id, *row] for row in rows]
    width = max(len(row) for row in rows)
    device = next(model.parameters()).device
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long,
                        device=device)
    was_training = model.training
    model.eval()
    try:
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                              do_sample=False, pad_token_id=pad_id, **options)
    finally:
        model.train(was_training)


def generate_general_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                           prompts: Sequence[str] = GENERATION_PROMPTS) -> list[str]:
    """The base model's greedy continuations of fixed diverse prompts, as text (deterministic).

    A repetition penalty keeps small models from looping on one phrase; decoding stays greedy.
    """
    new_tokens = max(8, min(256, math.ceil(max_tokens / len(prompts))))
    out = greedy_continuations(model, tokenizer, prompts, new_tokens, tokenizer.pad_token_id,
                               repetition_penalty=1.2)
    return tokenizer.batch_decode(out, skip_special_tokens=True)


def read_paragraphs(path: Path) -> list[str]:
    """The non-empty lines of a text file, stripped."""
    with path.open(encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f if line.strip()]


def token_windows(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase, max_tokens: int,
                  seq_len: int = SEQ_LEN) -> list[Tensor]:
    """Concatenate documents (EOS between them) up to ``max_tokens`` and cut into windows."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if not ids:
        raise ValueError("the general corpus produced no tokens")
    flat = torch.tensor(ids, dtype=torch.long)
    return list(flat.split(seq_len))
