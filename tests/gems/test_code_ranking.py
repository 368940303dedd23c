"""Ranking under semantic ids: the code trie, full-catalog code scores, constrained beam search."""

from __future__ import annotations

import polars as pl
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.code_beam_search import beam_search_items
from gems.code_scoring import score_codes
from gems.code_tokens import add_code_tokens
from gems.code_trie import CodeTrie
from gems.evaluate import evaluate_scorer
from gems.semantic_ids import assign_semantic_ids
from gems.token_rows import encode_titles, title_means

Backbone = tuple[PreTrainedModel, PreTrainedTokenizerBase]

PROMPTS = [
    "[rec] History: <item_1> Laser printer toner; <item_2> Stapler. Next item:",
    "[search] Query: hiking boots. Clicked item:",
    "Next item:",
]


def _catalog(backbone: Backbone, items: list[tuple[str, str]], levels: int = 2,
             codebook_size: int = 4) -> tuple[CodeTrie, list[list[int]]]:
    """Codes from the backbone's own mean title rows, added as tokens; the trie and PROMPTS encoded."""
    model, tok = backbone
    weight = model.get_input_embeddings().weight.detach()
    embeddings = title_means(weight, encode_titles(tok, [t for _, t in items]), weight.mean(0))
    ids = assign_semantic_ids([i for i, _ in items], embeddings, levels=levels, codebook_size=codebook_size)
    token_ids = add_code_tokens(model, tok, ids, [t for _, t in items])
    return CodeTrie(ids.item_ids, token_ids), [tok(p)["input_ids"] for p in PROMPTS]


def _naive_scores(model: PreTrainedModel, prompts: list[list[int]], codes: torch.Tensor) -> torch.Tensor:
    """One forward pass per (prompt, item): the sum of each code token's log-probability."""
    out = torch.empty(len(prompts), codes.shape[0])
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            for item, code in enumerate(codes.tolist()):
                log_probs = torch.log_softmax(model(torch.tensor([prompt + code])).logits[0].float(), -1)
                out[row, item] = sum(log_probs[len(prompt) - 1 + j, t] for j, t in enumerate(code))
    return out


# ------------------------------------------------------------------------------------- trie


def test_trie_walks_prefixes_to_items() -> None:
    trie = CodeTrie(["a", "b", "c", "d"], torch.tensor([[7, 3], [7, 5], [9, 3], [4, 3]]))
    assert [trie.nodes_at(d) for d in range(3)] == [1, 3, 4]
    assert trie.allowed_next([]) == [4, 7, 9]
    assert trie.allowed_next([7]) == [3, 5] and trie.allowed_next([9]) == [3]
    assert trie.allowed_next([8]) == [] and trie.allowed_next([7, 5]) == []
    assert [trie.item_of(c) for c in ([7, 5], [4, 3], [9, 5], [7])] == [1, 3, None, None]
    tokens, children = trie.children(1, trie.node_of([7]))
    assert tokens.tolist() == [3, 5] and trie.leaf_items[children].tolist() == [0, 1]


@pytest.mark.parametrize(("item_ids", "codes", "message"), [
    (["a", "b", "c"], torch.tensor([[1, 2], [1, 3], [1, 2]]), r"items \['a', 'c'\] share one code"),
    (["a"], torch.tensor([[1, 2], [1, 3]]), "1 item ids but 2 codes"),
    ([], torch.empty(0, 2, dtype=torch.long), "catalog is empty"),
    (["a"], torch.tensor([[-1, 2]]), "non-negative integer"),
    (["a"], torch.tensor([1, 2]), r"codes must be \[n_items, code_length >= 1\]"),
])
def test_bad_codes_are_a_value_error(item_ids: list[str], codes: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CodeTrie(item_ids, codes)


# ------------------------------------------------------------------------ full-catalog scores


def test_code_scores_equal_the_naive_per_item_sums(tiny_model_and_tokenizer: Backbone,
                                                   tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    trie, prompts = _catalog(tiny_model_and_tokenizer, tiny_items)
    assert trie.code_length == 3 and trie.nodes_at(2) < len(tiny_items), "shared prefixes are exercised"
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths exercise padding"

    scores = score_codes(model, prompts, trie, tok.pad_token_id, batch_size=2)

    assert scores.shape == (len(prompts), len(tiny_items)) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _naive_scores(model, prompts, trie.codes), rtol=0, atol=1e-4)
    alone = score_codes(model, prompts[2:], trie, tok.pad_token_id)
    torch.testing.assert_close(alone[0], scores[2], rtol=0, atol=1e-5)


def test_single_token_codes_score_the_prompt_end_alone(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    trie = CodeTrie(["x", "y", "z"], torch.tensor([[11], [40], [7]]))
    prompt = tok(PROMPTS[1])["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0, -1], -1)[[11, 40, 7]]
    torch.testing.assert_close(score_codes(model, [prompt], trie, tok.pad_token_id)[0], want,
                               rtol=0, atol=1e-5)


def test_code_scores_restore_mode_and_feed_the_evaluation(tiny_model_and_tokenizer: Backbone,
                                                          tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    trie, _ = _catalog(tiny_model_and_tokenizer, tiny_items)
    examples = pl.DataFrame({"prompt": PROMPTS[:2], "task": ["rec", "search"],
                             "history_item_ids": [["1", "2"], []], "target_item_id": ["3", "7"]})
    model.train()

    def scorer(rows: pl.DataFrame) -> torch.Tensor:
        return score_codes(model, [tok(p)["input_ids"] for p in rows["prompt"]], trie, tok.pad_token_id)

    result = evaluate_scorer(scorer, examples, trie.item_ids, progress=False, num_negatives=5)
    assert model.training and all(p.grad is None for p in model.parameters())
    counts = {task: result.metrics[task]["full"]["count"] for task in ("rec", "search")}
    assert counts == {"rec": 1, "search": 1}


def test_bad_scoring_input_is_a_value_error(tiny_model_and_tokenizer: Backbone) -> None:
    model, _ = tiny_model_and_tokenizer
    trie = CodeTrie(["x"], torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match=r"encoded prompts \[1\] are empty"):
        score_codes(model, [[5], []], trie, 0)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score_codes(model, [[5]], trie, 0, batch_size=0)
    with pytest.raises(ValueError, match=r"num_beams \(2\) must be >= top_n \(3\)"):
        beam_search_items(model, [[5]], trie, 0, top_n=3, num_beams=2)
    with pytest.raises(ValueError, match="top_n must be >= 1"):
        beam_search_items(model, [[5]], trie, 0, top_n=0)
    with pytest.raises(ValueError, match=r"encoded prompts \[0\] are empty"):
        beam_search_items(model, [[]], trie, 0)


# ------------------------------------------------------------------------------ beam search


def test_a_beam_as_wide_as_the_catalog_ranks_like_full_scores(tiny_model_and_tokenizer: Backbone,
                                                              tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    trie, prompts = _catalog(tiny_model_and_tokenizer, tiny_items)
    scores = score_codes(model, prompts, trie, tok.pad_token_id)

    found = beam_search_items(model, prompts, trie, tok.pad_token_id, top_n=len(tiny_items), batch_size=2)

    for row, ranked in enumerate(found):
        best = scores[row].topk(len(tiny_items))
        assert ranked[0][0] == trie.item_ids[int(best.indices[0])], "the same top item"
        assert [item for item, _ in ranked] == [trie.item_ids[i] for i in best.indices.tolist()]
        torch.testing.assert_close(torch.tensor([s for _, s in ranked]), best.values, rtol=0, atol=1e-4)


def test_a_narrow_beam_returns_only_distinct_catalog_items(tiny_model_and_tokenizer: Backbone,
                                                           tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    trie, prompts = _catalog(tiny_model_and_tokenizer, tiny_items)
    scores = score_codes(model, prompts, trie, tok.pad_token_id)
    index = {item: i for i, item in enumerate(trie.item_ids)}

    found = beam_search_items(model, prompts, trie, tok.pad_token_id, top_n=3, num_beams=4)

    for row, ranked in enumerate(found):
        items = [item for item, _ in ranked]
        assert len(items) == 3 and len(set(items)) == 3 and set(items) <= set(trie.item_ids)
        values = [s for _, s in ranked]
        assert values == sorted(values, reverse=True)
        # Each returned score is that item's exact code log-probability.
        torch.testing.assert_close(torch.tensor(values), scores[row, [index[i] for i in items]],
                                   rtol=0, atol=1e-4)


def test_a_beam_wider_than_the_catalog_returns_each_item_once(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    trie = CodeTrie(["x", "y"], torch.tensor([[11, 40], [11, 41]]))
    found = beam_search_items(model, [tok(PROMPTS[2])["input_ids"]], trie, tok.pad_token_id, top_n=5)
    assert sorted(item for item, _ in found[0]) == ["x", "y"]
