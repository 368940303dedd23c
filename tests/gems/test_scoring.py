"""Catalog scoring: one entry per item, equal to the naive full-logit computation per prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.model import add_item_tokens, load_backbone
from gems.scoring import left_pad, score_catalog
from tune.config import load_config

Backbone = tuple[PreTrainedModel, PreTrainedTokenizerBase]

PROMPTS = [
    "[rec] History: <item_1> Laser printer toner; <item_2> Stapler; <item_5> Spiral notebook. Next item:",
    "[search] History: <item_6> Running shoes. Query: hiking boots. Clicked item:",
    "Next item:",
    "[rec] History: <item_10> Coffee beans; <item_11> Green tea. Next item:",
    "[search] Query: a lamp for my desk. Clicked item:",
]


def _naive_last_logits(model: PreTrainedModel, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0, -1, :]


def _tiny_catalog(tied: bool, tmp_path: Path, tiny_items: list[tuple[str, str]]
                  ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, torch.Tensor, list[list[int]]]:
    """A tiny Llama (tied or untied head) with the items added, and PROMPTS encoded."""
    cfg = load_config("tiny", [f"model.tiny.tie_word_embeddings={str(tied).lower()}"]).model
    model, tok = load_backbone(cfg, tmp_path)
    item_ids = torch.tensor(add_item_tokens(model, tok, tiny_items))
    return model, tok, item_ids, [tok(p)["input_ids"] for p in PROMPTS]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_scores_equal_naive_logits_and_softmax(tied: bool, tmp_path: Path,
                                               tiny_items: list[tuple[str, str]]) -> None:
    model, tok, item_ids, prompts = _tiny_catalog(tied, tmp_path, tiny_items)
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise padding"

    scores = score_catalog(model, prompts, item_ids, tok.pad_token_id, batch_size=2)

    assert scores.shape == (len(PROMPTS), len(tiny_items)) and scores.dtype == torch.float32
    for row, prompt in enumerate(prompts):
        full = _naive_last_logits(model, prompt)
        torch.testing.assert_close(scores[row], full[item_ids], rtol=1e-4, atol=1e-5)
        # Softmax over the catalog = full-vocabulary softmax restricted to items, renormalised.
        restricted = torch.softmax(full, -1)[item_ids]
        torch.testing.assert_close(torch.softmax(scores[row], -1), restricted / restricted.sum(),
                                   rtol=1e-4, atol=1e-6)


def test_a_prompt_scores_the_same_alone_or_padded_in_a_batch(tiny_model_and_tokenizer: Backbone,
                                                             tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    item_ids = torch.tensor(add_item_tokens(model, tok, tiny_items))
    short, long = tok(PROMPTS[2])["input_ids"], tok(PROMPTS[0])["input_ids"]
    alone = score_catalog(model, [short], item_ids, tok.pad_token_id)
    padded = score_catalog(model, [long, short, long], item_ids, tok.pad_token_id, batch_size=3)
    torch.testing.assert_close(padded[1], alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(padded[0], padded[2], rtol=0, atol=0)


def test_scoring_restores_mode_and_builds_no_graph(tiny_model_and_tokenizer: Backbone,
                                                   tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    item_ids = torch.tensor(add_item_tokens(model, tok, tiny_items))
    model.train()
    scores = score_catalog(model, [tok(PROMPTS[1])["input_ids"]], item_ids, tok.pad_token_id)
    assert model.training and not scores.requires_grad
    assert all(p.grad is None for p in model.parameters())
    empty = score_catalog(model, [], item_ids, tok.pad_token_id)
    assert empty.shape == (0, len(tiny_items))


def test_bad_scoring_input_is_a_clear_error(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    ok = [tok("Next item:")["input_ids"]]
    with pytest.raises(ValueError, match=r"item_token_ids must lie in \[0, 768\)"):
        score_catalog(model, ok, torch.tensor([1, 768]), tok.pad_token_id)
    with pytest.raises(ValueError, match=r"encoded prompts \[1\] are empty"):
        score_catalog(model, [ok[0], []], torch.tensor([1]), tok.pad_token_id)
    with pytest.raises(ValueError, match="batch_size"):
        score_catalog(model, ok, torch.tensor([1]), tok.pad_token_id, batch_size=0)


def test_left_pad_puts_every_prompt_end_last() -> None:
    ids, mask = left_pad([[5, 6, 7], [9]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_bf16_body_scores_stay_fp32_close_and_restore_the_head(tied: bool, tmp_path: Path,
                                                              tiny_items: list[tuple[str, str]]) -> None:
    model, tok, item_ids, prompts = _tiny_catalog(tied, tmp_path, tiny_items)
    head = model.get_output_embeddings()

    full = score_catalog(model, prompts, item_ids, tok.pad_token_id, batch_size=2)
    low = score_catalog(model, prompts, item_ids, tok.pad_token_id, batch_size=2,
                        autocast_dtype=torch.bfloat16)
    assert low.dtype == torch.float32
    assert not torch.equal(low, full), "the body ran under bf16 autocast"
    assert torch.allclose(low, full, atol=0.1 * full.abs().max().item())
    # The head ran in fp32: scores carry more than bf16's 8 mantissa bits (bf16 logits would tie).
    assert (low != low.bfloat16().float()).float().mean() > 0.9
    assert "forward" not in head.__dict__, "the head's own forward is back"

    with pytest.raises(IndexError):  # a token beyond the vocabulary fails inside the forward pass
        score_catalog(model, [[len(tok) + 10]], item_ids, tok.pad_token_id, autocast_dtype=torch.bfloat16)
    assert "forward" not in head.__dict__, "restored on the error path too"
    assert torch.equal(score_catalog(model, prompts, item_ids, tok.pad_token_id, batch_size=2), full)
