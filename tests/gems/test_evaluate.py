"""The batched evaluator: any scorer, both protocols, masking, batch invariance, top-k."""

import polars as pl
import pytest
import torch

from gems.evaluate import evaluate_scorer, subsample_per_task

CATALOG = [f"i{j}" for j in range(30)]


def _examples(n: int = 10) -> pl.DataFrame:
    return pl.DataFrame({
        "example_id": [f"e{i}" for i in range(n)],
        "task": ["rec" if i % 2 else "search" for i in range(n)],
        "prompt": [f"p{i}" for i in range(n)],
        "history_item_ids": [[f"i{(i + 1) % 30}", f"i{(i + 2) % 30}"] for i in range(n)],
        "target_item_id": [f"i{i}" for i in range(n)],
    })


def _history_loving_scorer(rows: pl.DataFrame) -> torch.Tensor:
    """Puts the two history items first and the target third: masking decides Hit@1 for rec."""
    scores = torch.zeros(rows.height, len(CATALOG))
    for r, (hist, target) in enumerate(zip(rows["history_item_ids"].to_list(),
                                           rows["target_item_id"].to_list(), strict=True)):
        scores[r, CATALOG.index(hist[0])] = 3.0
        scores[r, CATALOG.index(hist[1])] = 2.5
        scores[r, CATALOG.index(target)] = 2.0
    return scores


def test_masking_and_protocols_per_task() -> None:
    result = evaluate_scorer(_history_loving_scorer, _examples(), CATALOG, batch_size=4,
                             num_negatives=5, progress=False)
    assert result.metrics["rec"]["full"]["hit_at_1"] == 1.0
    assert result.metrics["search"]["full"]["mrr"] == pytest.approx(1 / 3)
    assert result.metrics["search"]["sampled"]["mrr"] >= 1 / 3
    assert result.metrics["rec"]["full"]["count"] == 5.0
    assert result.unified == pytest.approx((1.0 + 0.5) / 2)  # ndcg@10 at rank 3 is 0.5


def test_batch_size_does_not_change_results() -> None:
    g = torch.Generator().manual_seed(0)
    table = torch.randn(10, len(CATALOG), generator=g)

    def scorer(rows: pl.DataFrame) -> torch.Tensor:
        return table[[int(e[1:]) for e in rows["example_id"].to_list()]]

    one = evaluate_scorer(scorer, _examples(), CATALOG, batch_size=1, progress=False, top_k=3)
    many = evaluate_scorer(scorer, _examples(), CATALOG, batch_size=7, progress=False, top_k=3)
    assert one.metrics == many.metrics
    assert one.top_k is not None and one.top_k.equals(many.top_k)


def test_top_k_excludes_masked_history_and_reports_rank() -> None:
    result = evaluate_scorer(_history_loving_scorer, _examples(4), CATALOG, progress=False,
                             top_k=2)
    top = result.top_k
    assert top is not None and top.columns == ["example_id", "task", "target_item_id", "rank",
                                               "top_item_ids", "top_scores"]
    rec = top.filter(pl.col("task") == "rec").row(0, named=True)
    assert rec["top_item_ids"][0] == rec["target_item_id"] and rec["rank"] == 1
    search = top.filter(pl.col("task") == "search").row(0, named=True)
    assert search["rank"] == 3 and search["target_item_id"] not in search["top_item_ids"]


def test_unknown_target_is_a_clear_error() -> None:
    bad = _examples(2).with_columns(pl.lit("zzz").alias("target_item_id"))
    with pytest.raises(ValueError, match="not in the evaluated catalog"):
        evaluate_scorer(_history_loving_scorer, bad, CATALOG, progress=False)


def test_wrong_score_shape_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        evaluate_scorer(lambda rows: torch.zeros(rows.height, 3), _examples(2), CATALOG,
                        progress=False)


def test_subsample_per_task_is_seeded_and_capped() -> None:
    ex = _examples(20)
    a = subsample_per_task(ex, 4, seed=1)
    assert a["task"].value_counts().sort("task")["count"].to_list() == [4, 4]
    assert a.equals(subsample_per_task(ex, 4, seed=1))
    assert not a.equals(subsample_per_task(ex, 4, seed=2))
    assert subsample_per_task(ex, None).equals(ex)


def test_evaluate_model_matches_independent_per_prompt_scoring(tiny_model_and_tokenizer,
                                                               tiny_items, tiny_cfg) -> None:
    """The LLM path (prompt encoding, batching, item order) equals scoring each prompt alone."""
    from gems.evaluate import evaluate_model, evaluate_with_config
    from gems.model import add_item_tokens
    from gems.prompts import encode_prompt, format_prompt

    model, tokenizer = tiny_model_and_tokenizer
    item_token_ids = torch.tensor(add_item_tokens(model, tokenizer, tiny_items))
    catalog = [item_id for item_id, _ in tiny_items]
    titles = dict(tiny_items)
    rows = []
    for i in range(12):
        task = "rec" if i % 3 else "search"
        history = [catalog[(i + j) % 20] for j in range(3)]
        query = "desk lamp for the office" if task == "search" else None
        prompt = format_prompt(task, [(h, titles[h]) for h in history], query, 3)
        rows.append({"example_id": f"x{i}", "task": task, "prompt": prompt, "query": query,
                     "history_item_ids": history, "target_item_id": catalog[(i * 7) % 20]})
    examples = pl.DataFrame(rows)

    def alone(batch: pl.DataFrame) -> torch.Tensor:
        out = []
        for prompt in batch["prompt"].to_list():
            ids = torch.tensor([encode_prompt(tokenizer, prompt, 64)])
            with torch.no_grad():
                out.append(model(input_ids=ids).logits[0, -1, item_token_ids])
        return torch.stack(out)

    result = evaluate_model(model, tokenizer, examples, catalog, item_token_ids, max_len=64,
                            batch_size=5, num_negatives=10, progress=False, top_k=4)
    reference = evaluate_scorer(alone, examples, catalog, batch_size=1, num_negatives=10,
                                progress=False, top_k=4)
    assert set(result.metrics) == {"search", "rec"}
    for task, protos in reference.metrics.items():
        for proto, named in protos.items():
            assert result.metrics[task][proto] == pytest.approx(named, abs=1e-6)
    assert result.top_k["top_item_ids"].to_list() == reference.top_k["top_item_ids"].to_list()
    capped = evaluate_with_config(model, tokenizer, examples, catalog, item_token_ids,
                                  tiny_cfg.model_copy(update={"eval": tiny_cfg.eval.model_copy(
                                      update={"max_examples": 2})}), progress=False)
    assert capped.metrics["rec"]["full"]["count"] == 2.0
    assert capped.metrics["search"]["full"]["count"] == 2.0
