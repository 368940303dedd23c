"""DPMoE's two views of a task-tagged prompt: titles only vs item tokens only, every token marked
context or history, oldest history dropped first, and a scorer that ranks the whole catalog."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from gems.dpmoe import DPMoEModel
from gems.dpmoe_config import DPMoEConfig
from gems.dual_view import collate_views, dpmoe_scorer, encode_views, view_entries
from gems.evaluate import evaluate_scorer
from gems.items import item_token
from gems.model import add_item_tokens
from gems.prompts import format_prompt

TARGETS = ("q_proj", "v_proj")


def _prompt(tiny_items, n: int, task: str = "search") -> str:
    return format_prompt(task, tiny_items[:n], "blue pen" if task == "search" else None, 3)


def test_views_keep_one_signal_each(tiny_items) -> None:
    prompt = _prompt(tiny_items, 3)
    body = prompt.split("History: ", 1)[1].split(". Query:")[0]
    views = view_entries(body)
    assert [item_token(i) for i, _ in tiny_items[:3]] == views["behavioural"]
    assert all("<" not in e and e for e in views["semantic"])
    assert view_entries("none") == {"semantic": [], "behavioural": []}


def test_encoded_views_mark_history_and_truncate_oldest_first(tiny_model_and_tokenizer, tiny_items) -> None:
    model, tok = tiny_model_and_tokenizer
    add_item_tokens(model, tok, tiny_items)
    prompt = _prompt(tiny_items, 6)
    full = encode_views(tok, prompt, 512)
    for view, (ids, segment) in full.items():
        assert len(ids) == len(segment) and 0 < sum(segment) < len(ids), view
        history = tok.decode([t for t, s in zip(ids, segment, strict=True) if s])
        context = tok.decode([t for t, s in zip(ids, segment, strict=True) if not s])
        assert "Query: blue pen" in context and "History:" in context
        assert (item_token(tiny_items[0][0]) in history) == (view == "behavioural")
    ids, segment = full["semantic"]
    short = encode_views(tok, prompt, len(ids) - 1)["semantic"]
    assert len(short[0]) < len(ids) and sum(short[1]) < sum(segment)
    assert tok.decode(short[0]).endswith(tok.decode(ids[-5:]))  # the cue and query survive
    with pytest.raises(ValueError, match="task-tagged"):
        encode_views(tok, "hello", 32)


def test_collated_views_and_scorer_rank_the_catalog(tiny_model_and_tokenizer, tiny_items) -> None:
    model, tok = tiny_model_and_tokenizer
    item_token_ids = add_item_tokens(model, tok, tiny_items)
    prompts = [_prompt(tiny_items, n, task) for n, task in ((2, "search"), (5, "rec"), (1, "rec"))]
    batch = collate_views([encode_views(tok, p, 64) for p in prompts], int(tok.pad_token_id))
    sem = batch["semantic"]
    assert sem.input_ids.shape[0] == 3 and bool((sem.attention_mask[:, -1] == 1).all())  # left padded
    assert torch.equal(sem.context_mask + sem.history_mask, sem.attention_mask)
    dp = DPMoEModel(model, DPMoEConfig(), TARGETS, item_token_ids)
    rows = pl.DataFrame({"example_id": ["a", "b", "c"], "task": ["search", "rec", "rec"], "prompt": prompts,
                         "history_item_ids": [[i for i, _ in tiny_items[:n]] for n in (2, 5, 1)],
                         "target_item_id": [tiny_items[5][0], tiny_items[7][0], tiny_items[9][0]]})
    scores = dpmoe_scorer(dp, tok, 64, batch_size=2)(rows)
    assert scores.shape == (3, len(tiny_items)) and torch.isfinite(scores).all()
    result = evaluate_scorer(dpmoe_scorer(dp, tok, 64), rows, [i for i, _ in tiny_items], batch_size=2,
                             progress=False, num_negatives=5)
    assert set(result.metrics) == {"search", "rec"}


def test_semantic_view_takes_titles_from_the_catalog_when_the_prompt_shows_tokens_only(
        tiny_model_and_tokenizer, tiny_items) -> None:
    model, tok = tiny_model_and_tokenizer
    add_item_tokens(model, tok, tiny_items)
    prompt = format_prompt("rec", tiny_items[:3], None, 0)  # data.title_max_words: 0
    assert view_entries(prompt.split("History: ", 1)[1].split(". Next")[0])["semantic"] == ["", "", ""]
    titles = dict(tiny_items)
    views = view_entries(prompt.split("History: ", 1)[1].split(". Next")[0], titles, title_words=2)
    assert views["semantic"] == [" ".join(t.split()[:2]) for _, t in tiny_items[:3]]
    ids, segment = encode_views(tok, prompt, 128, titles, 2)["semantic"]
    history = tok.decode([t for t, s in zip(ids, segment, strict=True) if s])
    assert tiny_items[2][1].split()[0] in history and "<item_" not in history
