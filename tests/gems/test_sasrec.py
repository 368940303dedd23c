"""SASRec floor: learns, is causal and deterministic, early-stops to its best epoch, fuses with
BM25 as documented, runs through the comparison's evaluation path; item vectors and projection."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest
import torch

from gems.floors import BM25Floor
from gems.lexical_fusion import fuse, zscore
from gems.metrics import full_catalog_ranks
from gems.sasrec import SASRec, encode_examples, score_examples
from gems.sasrec_config import SASRecConfig
from gems.sasrec_floor import sasrec_scorer, tune_fusion_weight
from gems.sasrec_train import ValSet, fit_sasrec
from gems.sasrec_vectors import (
    fit_orthogonal_map,
    fit_projection,
    load_item_vectors,
    project_to_width,
    sasrec_item_vectors,
    save_item_vectors,
)
from tune.config import load_config

ITEMS = [f"i{n}" for n in range(30)]
FAST = SASRecConfig(hidden=32, blocks=2, heads=2, dropout=0.0, lr=1e-2, batch_size=8, max_len=8,
                    max_epochs=60, patience=5)


def _rows(histories: list[list[str]], targets: list[str], tasks: list[str] | None = None,
          queries: list[str | None] | None = None) -> pl.DataFrame:
    n = len(histories)
    return pl.DataFrame({"example_id": [f"e{i}" for i in range(n)],
                         "task": tasks or ["rec"] * n, "query": queries or [None] * n,
                         "history_item_ids": histories, "target_item_id": targets},
                        schema_overrides={"query": pl.Utf8, "history_item_ids": pl.List(pl.Utf8)})


def _sequences(n: int, seed: int = 0, random_targets: bool = False) -> pl.DataFrame:
    """n distinct histories of 1-5 items; the target is a fixed function of the history
    (or random, for a task with nothing to learn)."""
    rng = random.Random(seed)
    histories = [rng.sample(ITEMS, rng.randint(1, 5)) for _ in range(n)]
    targets = [rng.choice(ITEMS) if random_targets else ITEMS[(7 * ITEMS.index(h[-1]) + len(h)) % 30]
               for h in histories]
    return _rows(histories, targets)


def test_overfits_a_tiny_sequence_set() -> None:
    train = _sequences(20)
    fit = fit_sasrec(train, None, ITEMS, FAST.model_copy(update={"max_epochs": 80}), seed=0)
    assert fit.epochs == 80 and fit.history[-1]["loss"] < 0.1 < fit.history[0]["loss"]
    targets = torch.tensor([ITEMS.index(t) for t in train["target_item_id"].to_list()])
    ranks = full_catalog_ranks(score_examples(fit.model, train), targets)
    assert float((ranks == 1).float().mean()) >= 0.95


def test_scores_at_a_position_ignore_later_items() -> None:
    torch.manual_seed(0)
    model = SASRec(ITEMS, FAST.model_copy(update={"dropout": 0.3})).eval()
    items = torch.tensor([[3, 7, 9, 11, 2], [3, 7, 25, 1, 0]])
    hidden = model.hidden_states(items, torch.tensor([1, 1]))
    assert torch.allclose(hidden[0, :3], hidden[1, :3], atol=1e-6)  # start, 3, 7 read identically
    assert not torch.allclose(hidden[0, 3], hidden[1, 3])
    # a row's scores depend only on its own history, not on the batch's padding width
    rows = _rows([["i3", "i7"], ["i3", "i7", "i9", "i1", "i2"]], ["i1", "i1"])
    alone = score_examples(model, rows.head(1))
    assert torch.allclose(score_examples(model, rows)[0], alone[0], atol=1e-5)


def test_empty_history_and_task_token() -> None:
    model = SASRec(ITEMS, FAST).eval()
    rows = _rows([[], []], ["i1", "i1"], tasks=["rec", "search"], queries=[None, "pens"])
    batch = encode_examples(rows, model, with_targets=True)
    assert batch.lengths.tolist() == [0, 0] and batch.starts.tolist() == [1, 0]
    scores = score_examples(model, rows)
    assert scores.shape == (2, 30) and not torch.allclose(scores[0], scores[1])


def test_early_stopping_restores_the_best_epoch() -> None:
    cfg = FAST.model_copy(update={"patience": 2, "max_epochs": 40})
    train, val = _sequences(40, seed=1, random_targets=True), _sequences(30, seed=2, random_targets=True)
    fit = fit_sasrec(train, val, ITEMS, cfg, seed=3)
    values = [h["val/ndcg_at_10"] for h in fit.history]
    assert len(values) == fit.epochs and fit.epochs < 40  # stopped early
    assert fit.best_epoch == values.index(max(values)) + 1 and fit.best_val == max(values)
    assert fit.epochs == fit.best_epoch + cfg.patience
    assert values[-1] < fit.best_val
    assert ValSet.build(val, ITEMS, True).ndcg_at_10(fit.model)["rec"] == pytest.approx(fit.best_val)


def test_same_seed_same_scores_other_seed_other_scores() -> None:
    train, val = _sequences(30, seed=4), _sequences(10, seed=5)
    cfg = FAST.model_copy(update={"dropout": 0.2, "max_epochs": 4})
    state = torch.random.get_rng_state()
    a, b, c = (score_examples(fit_sasrec(train, val, ITEMS, cfg, seed=s).model, val) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone


def test_trains_on_its_own_thread_count_and_restores_the_callers() -> None:
    before = torch.get_num_threads()
    seen = []
    torch.set_num_threads(2)
    try:
        model = SASRec(ITEMS, FAST.model_copy(update={"threads": 1}))
        handle = model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        score_examples(model, _sequences(3))
        handle.remove()
        assert seen == [1] and torch.get_num_threads() == 2
        fit_sasrec(_sequences(5), None, ITEMS, FAST.model_copy(update={"max_epochs": 1, "threads": None}))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_item_vectors_follow_the_catalog_order() -> None:
    model = SASRec(ITEMS, FAST)
    vectors = sasrec_item_vectors(model)
    assert vectors.shape == (30, 32) and not vectors.requires_grad
    assert torch.equal(vectors[4], model.item_emb.weight[5].detach())  # row 0 is padding
    order = ["i7", "i0", "i29"]
    assert torch.equal(sasrec_item_vectors(model, order), vectors[[7, 0, 29]])
    with pytest.raises(ValueError, match="not in the SASRec catalog"):
        sasrec_item_vectors(model, ["nope"])


def test_projection_recovers_a_known_linear_map_and_vectors_round_trip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 16, generator=g) * 5.0
    w, b = torch.randn(16, 40, generator=g), torch.randn(40, generator=g)
    target = (x @ w + b).to(torch.bfloat16).float()
    weight, bias = fit_projection(x, target, ridge=0.0)
    assert torch.allclose(weight.float(), w, atol=0.05) and torch.allclose(bias.float(), b, atol=0.1)
    projected = project_to_width(x, target.half(), ridge=1e-4, mapping="ridge")
    assert projected.dtype == torch.float16 and projected.shape == (300, 40)
    assert float((projected.float() - target).norm() / target.norm()) < 0.01
    path = save_item_vectors(tmp_path / "v" / "sasrec.safetensors", x, [str(i) for i in range(300)])
    vectors, ids = load_item_vectors(path)
    assert torch.equal(vectors, x) and ids == [str(i) for i in range(300)]
    with pytest.raises(ValueError, match="item ids"):
        save_item_vectors(tmp_path / "bad.safetensors", x, ["1"])


def test_orthogonal_map_keeps_which_items_go_together_and_ridge_does_not() -> None:
    """A known scaled rotation is recovered; item-to-item similarities of the centred vectors
    survive the map up to one factor, so every item keeps its nearest neighbour. The ridge map onto
    targets that reflect only part of the vectors loses that."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g)
    rotation, _ = torch.linalg.qr(torch.randn(24, 8, generator=g))  # 8 orthonormal columns in 24-d
    target = 3.0 * x @ rotation.T + 1.0
    weight, bias = fit_orthogonal_map(x, target)
    torch.testing.assert_close((x.double() @ weight + bias).float(), target, atol=1e-4, rtol=1e-4)

    # targets that carry only 2 of the 8 collaborative directions (e.g. a category), plus noise
    titles = x[:, :2] @ torch.randn(2, 24, generator=g) + 0.1 * torch.randn(200, 24, generator=g)
    xc = x - x.mean(0)
    gram = xc @ xc.T
    for mapping in ("orthogonal", "ridge"):
        rows = project_to_width(x, titles, mapping=mapping)
        assert rows.shape == (200, 24)
        rc = rows - rows.mean(0)
        kept = torch.corrcoef(torch.stack([(rc @ rc.T).flatten(), gram.flatten()]))[0, 1]
        nearest = lambda m: (m - torch.diag(torch.full((200,), float("inf")))).argmax(1)  # noqa: E731
        same_neighbour = float((nearest(rc @ rc.T) == nearest(gram)).float().mean())
        if mapping == "orthogonal":
            assert kept > 0.999 and same_neighbour == 1.0
            assert abs(float(rc.norm(dim=1).mean() / (titles - titles.mean(0)).norm(dim=1).mean()) - 1) < 1e-4
        else:
            assert kept < 0.9 and same_neighbour < 0.5
    with pytest.raises(ValueError, match="collab_map"):
        project_to_width(x, titles, mapping="pca")


def test_fusion_ends_are_sasrec_and_bm25_orders() -> None:
    sas, lexical = torch.randn(3, 30), torch.randn(3, 30).abs()
    targets = torch.tensor([0, 5, 9])
    assert torch.equal(full_catalog_ranks(fuse(sas, lexical, 0.0), targets), full_catalog_ranks(sas, targets))
    assert torch.equal(full_catalog_ranks(fuse(sas, lexical, 1.0), targets),
                       full_catalog_ranks(lexical, targets))
    assert torch.equal(zscore(torch.ones(2, 5)), torch.zeros(2, 5))


def test_fusion_weight_is_tuned_on_val_search_rows() -> None:
    items = pl.DataFrame({"item_id": ITEMS, "title": [f"thing{n} kind{n % 3}" for n in range(30)]})
    model = SASRec(ITEMS, FAST).eval()
    bm25 = BM25Floor.fit(items, ITEMS)
    val = _rows([["i1"], ["i2"], ["i3"]], ["i4", "i5", "i9"], tasks=["search", "search", "rec"],
                queries=["thing4", "thing5", None])
    weight, values = tune_fusion_weight(model, bm25, val, [0.0, 0.5, 1.0])
    assert set(values) == {0.0, 0.5, 1.0} and weight > 0 and values[weight] == max(values.values())
    scores = sasrec_scorer(model, bm25, weight)(val)
    assert torch.equal(scores[2], score_examples(model, val)[2])  # rec rows are plain SASRec
    assert [ITEMS[int(i)] for i in scores[:2].argmax(dim=1)] == ["i4", "i5"]


def test_sasrec_runs_through_the_comparison_path(tmp_path: Path) -> None:
    """Tiny synthetic shards -> the harness's SASRec rows (results.csv schema, both methods, both
    tasks and protocols, timings with the fit's steps)."""
    from gems.data.inprocess import preprocess_inprocess
    from gems.data.shards import read_split
    from tune.study import results as res
    from tune.study.methods import parse_methods
    from tune.study.run import _sasrec_rows, catalog, expected_metrics

    cfg = load_config("tiny", [f"state_dir={tmp_path}", "data.now_ts=1800000000", "eval.num_negatives=9",
                               "sasrec.max_epochs=3", "sasrec.hidden=16"])
    preprocess_inprocess(cfg)
    shard_dir = cfg.resolve(cfg.data.output_dir)
    items, item_ids = catalog(shard_dir)
    test = read_split(shard_dir, "test")
    specs = parse_methods("sasrec,sasrec-bm25")
    assert [s.kind for s in specs] == ["sasrec", "sasrec"]
    from tune.study.ranks import read_ranks

    rows, timings, summary = _sasrec_rows(cfg, shard_dir, test, items, item_ids, specs, seed=2,
                                          out_dir=tmp_path / "out")
    assert "best epoch" in summary
    ranks = read_ranks(tmp_path / "out")  # per-row test ranks beside the aggregate rows
    for spec in specs:
        mine = ranks.filter((pl.col("method") == spec.label) & (pl.col("seed") == 2))
        assert mine.height == test.height and mine["rank"].min() >= 1
    frame = res.rows_frame(rows)
    assert tuple(frame.columns) == res.COLUMNS and set(frame["seed"].to_list()) == {2}
    for spec in specs:
        got = {(r.task, r.metric, r.protocol) for r in rows if r.method == spec.label}
        assert got == expected_metrics(spec, retention=True)
    rec = {r.method: r.value for r in rows if (r.task, r.metric, r.protocol) == ("rec", "mrr", "full")}
    assert rec["sasrec"] == rec["sasrec-bm25"]  # the fusion only touches search
    assert [t.method for t in timings] == ["sasrec", "sasrec-bm25"]
    assert all(t.steps > 0 and t.train_s > 0 for t in timings)


def test_sasrec_methods_parse_and_keep_old_study_keys() -> None:
    from gems.config import ConfigError
    from tune.study.methods import parse_methods
    from tune.study.run import study_key

    with pytest.raises(ConfigError, match="no inline overrides"):
        parse_methods("sasrec[dropout=0.1]")
    cfg = load_config("tiny")
    assert study_key(cfg) == study_key(load_config("tiny", ["sasrec.seed=0"]))
    assert study_key(cfg) != study_key(load_config("tiny", ["sasrec.dropout=0.1"]))
    # the attention kernel is speed only: studies measured under another kernel stay resumable
    assert study_key(cfg) == study_key(load_config("tiny", ["model.attention=sdpa"]))
    assert study_key(cfg) != study_key(load_config("tiny", ["train.precision=bf16"]))


def test_config_section_validates() -> None:
    from gems.config import ConfigError

    with pytest.raises(ConfigError, match="sasrec.hidden"):
        load_config("tiny", ["sasrec.hidden=30", "sasrec.heads=4"])
    with pytest.raises(ConfigError, match="sasrec.search_fusion_weight"):
        load_config("tiny", ["sasrec.search_fusion_weight=2"])
