"""The comparison harness: method/ablation parsing, and a CI-sized end-to-end study (tiny Llama,
real Ray Train, real MLflow) whose output files must have the contract's schema and hold every
metric for every method; a re-run with the same output directory resumes instead of retraining."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from mlflow import MlflowClient

from gems.config import ConfigError
from gems.paths import shared_file
from tune.config import load_config
from tune.study.methods import fused_label, parse_methods, parse_seeds
from tune.study.ranks import read_ranks, seen_split
from tune.study.results import COLUMNS, RANKING_METRICS, RETENTION
from tune.study.run import expected_metrics

ALL_METHODS = "gems,adamw,lora,galore,dpmoe,adamw+flow,popularity,itemknn,bm25,sasrec,sasrec-bm25"


# --------------------------------------------------------------------------- parsing (fast)


def test_methods_with_inline_overrides_and_named_variants() -> None:
    specs = parse_methods("gems,gems[k=0,fixed_gate=0.5],gems-shared,lora[lora_r=8],bm25")
    assert [s.label for s in specs] == ["gems", "gems[k=0,fixed_gate=0.5]", "gems-shared",
                                        "lora[lora_r=8]", "bm25"]
    assert [s.kind for s in specs] == ["llm", "llm", "llm", "llm", "floor"]
    cfg = load_config("tiny")
    ablated = specs[1].config(cfg, seed=3)
    assert (ablated.gems.method, ablated.gems.k, ablated.gems.fixed_gate) == ("gems", 0, 0.5)
    assert ablated.train.seed == 3
    assert specs[2].config(cfg, 0).gems.task_subspaces is False
    lora = specs[3].config(cfg, 0)
    assert (lora.gems.method, lora.gems.lora_r) == ("lora", 8)
    # the budget is untouched by per-method overrides
    assert (ablated.train.max_steps, ablated.train.batch_size) == (cfg.train.max_steps, cfg.train.batch_size)


def test_loss_reweighting_suffixes() -> None:
    specs = parse_methods("gems+talr,adamw+flow,gems-nonull+talr[k=8],lora")
    cfg = load_config("tiny")
    talr, flow, ablated, plain = (s.config(cfg, 0) for s in specs)
    assert [s.label for s in specs] == ["gems+talr", "adamw+flow", "gems-nonull+talr[k=8]", "lora"]
    assert (talr.gems.method, talr.train.token_weighting) == ("gems", "talr")
    assert (flow.gems.method, flow.train.token_weighting) == ("adamw", "flow")
    assert (ablated.gems.method, ablated.gems.k, ablated.train.token_weighting) == ("gems", 8, "talr")
    assert plain.train.token_weighting == "none"


@pytest.mark.parametrize("text, message", [
    ("gems,sgd", "unknown method 'sgd'"),
    ("gems+focal", "one loss reweighting"),
    ("gems+talr+flow", "one loss reweighting"),
    ("bm25+talr", "floors take no overrides"),
    ("gems[train.max_steps=500]", "shared budget"),
    ("gems[k=0", "unbalanced"),
    ("bm25[k1=2]", "floors take no overrides"),
    ("gems,gems", "more than once"),
    ("gems,,lora", "empty method name"),
])
def test_bad_method_lists_fail_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_methods(text)


def test_invalid_ablation_value_fails_at_config_time() -> None:
    spec = parse_methods("gems[tau=-1]")[0]
    with pytest.raises(ConfigError, match="gems.tau"):
        spec.config(load_config("tiny"), 0)


def test_seeds() -> None:
    assert parse_seeds("0,1") == [0, 1]
    for bad in ("", "a", "0,0", "-1"):
        with pytest.raises(ConfigError):
            parse_seeds(bad)


# ----------------------------------------------------------------------- end to end (slow)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    import ray

    from pipelines.compare import main

    root = tmp_path_factory.mktemp("compare")
    out = root / "out"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = ["--smoke-test", "--methods", ALL_METHODS, "--out", str(out),
            "--set", f"state_dir={root / 'state'}", "--set", f"mlflow.tracking_uri={uri}",
            "--set", "eval.bm25_fusion=true"]  # every LLM run also reports '<label>+bm25'
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(args) == 0
        first = (out / "results.csv").read_text()
        assert main(args) == 0  # resumed: every (method, seed) already done, nothing retrained
        assert (out / "results.csv").read_text() == first
        subset = [a if a != ALL_METHODS else "popularity" for a in args]
        assert main(subset) == 0  # a command with fewer methods keeps the others' results
        assert (out / "results.csv").read_text() == first
        with pytest.raises(ValueError, match="another config"):  # other budget, same --out
            main([*args, "--set", "train.max_steps=4"])
    finally:
        ray.shutdown()
    return root, out, uri


@pytest.mark.slow
def test_results_schema_and_every_method_has_every_metric(study: tuple[Path, Path, str]) -> None:
    _, out, _ = study
    frame = pl.read_csv(out / "results.csv")
    assert tuple(frame.columns) == COLUMNS
    assert set(frame["task"].unique()) == {"search", "rec", "general"}
    assert set(frame["protocol"].unique()) == {"full", "sampled", RETENTION}
    assert all(math.isfinite(v) for v in frame["value"].to_list())
    ranking = frame.filter(pl.col("metric").is_in(RANKING_METRICS))
    assert ranking["value"].min() >= 0.0 and ranking["value"].max() <= 1.0
    retention_available = shared_file("general", "wikitext2", "test.txt") is not None
    specs = parse_methods(ALL_METHODS)
    labelled = [(s.label, s) for s in specs] + [(fused_label(s.label), s) for s in specs if s.is_llm]
    for label, spec in labelled:
        got = {(r["task"], r["metric"], r["protocol"])
               for r in frame.filter(pl.col("method") == label).iter_rows(named=True)}
        want = expected_metrics(spec, retention=True)
        if not retention_available:  # perplexity/MMLU need shared data; KL is always measured
            want = {w for w in want if w[0] != "general"} | {("general", "kl", RETENTION)}
            got = {g for g in got if g[0] != "general"} | {("general", "kl", RETENTION)}
        assert got == want, label
    # a fused row is its model's on rec and in retention (one model, BM25 only enters search)
    for spec in (s for s in specs if s.is_llm):
        mine, fused = (frame.filter((pl.col("method") == m) & (pl.col("task") != "search"))
                       .sort("task", "metric", "protocol")["value"]
                       for m in (spec.label, fused_label(spec.label)))
        assert mine.to_list() == fused.to_list(), spec.label
    # DPMoE's experts act only inside its views: on plain text it is the base model (KL over the
    # original vocabulary is 0; perplexity still pays for the item rows' share, like every method)
    kl = frame.filter((pl.col("method") == "dpmoe") & (pl.col("metric") == "kl"))["value"]
    assert kl.len() == 1 and abs(kl[0]) < 1e-6
    # Hit@K is monotone in K for every method, task and protocol
    for (method, task, proto), part in ranking.group_by(["method", "task", "protocol"]):
        hits = dict(part.select("metric", "value").iter_rows())
        assert hits["hit_at_1"] <= hits["hit_at_5"] <= hits["hit_at_10"], (method, task, proto)


@pytest.mark.slow
def test_per_row_ranks_reproduce_every_methods_full_catalog_ndcg(study: tuple[Path, Path, str]) -> None:
    """ranks/*.parquet hold each test row's rank; their NDCG@10 is results.csv's, method by method."""
    _, out, _ = study
    frame = pl.read_csv(out / "results.csv").filter((pl.col("metric") == "ndcg_at_10")
                                                     & (pl.col("protocol") == "full"))
    ranks = read_ranks(out)
    table = seen_split(ranks, [])  # nothing seen: one group per method, seed and task
    specs = parse_methods(ALL_METHODS)
    fused = {fused_label(s.label) for s in specs if s.is_llm}
    assert set(table["method"]) == {s.label for s in specs} | fused
    for row in table.iter_rows(named=True):
        want = frame.filter((pl.col("method") == row["method"]) & (pl.col("task") == row["task"])
                            & (pl.col("seed") == row["seed"]))["value"]
        assert want.len() == 1 and row["ndcg_at_10"] == pytest.approx(want[0], abs=1e-9), row


@pytest.mark.slow
def test_readable_table_timings_and_plots(study: tuple[Path, Path, str]) -> None:
    _, out, _ = study
    md = (out / "results.md").read_text()
    for label in ALL_METHODS.split(","):
        assert f"| {label} |" in md
    assert "Command: `python pipelines/compare.py --smoke-test" in md
    timings = pl.read_csv(out / "timings.csv")
    trained = timings.filter(pl.col("steps") > 0)
    assert sorted(trained["method"].to_list()) == [
        "adamw", "adamw+bm25", "adamw+flow", "adamw+flow+bm25", "dpmoe", "dpmoe+bm25", "galore",
        "galore+bm25", "gems", "gems+bm25", "lora", "lora+bm25", "sasrec", "sasrec-bm25"]
    assert (trained["train_s"] > 0).all()
    llm = trained.filter(~pl.col("method").str.starts_with("sasrec"))
    assert (llm["trainable_params"] > 0).all() and (llm["optimizer_state_mb"] > 0).all()
    assert (llm["peak_rss_gb"] > 0.1).all()
    params = dict(zip(llm["method"].to_list(), llm["trainable_params"].to_list(), strict=True))
    assert params["lora"] < params["adamw"] == params["gems"]  # adapters + item rows vs every weight
    # DPMoE's 7 experts of rank 8 on every target layer outnumber the tiny backbone; only they count
    assert params["dpmoe"] != params["adamw"] and (llm["tokens_per_s"] > 0).all()
    assert "| optimizer state (MiB) |" in md
    for name in ("ndcg10_full.png", "ndcg10_sampled.png", "retention.png", "conflict.png", "pareto.png"):
        assert (out / name).stat().st_size > 1000, name


@pytest.mark.slow
def test_mlflow_parent_with_one_child_per_llm_run_and_conflict_for_adamw_and_gems(
        study: tuple[Path, Path, str]) -> None:
    _, _, uri = study
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gems-sr")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("gems.pipeline") == "compare"]
    assert len(parents) == 3  # the first run, the resumed one, the one with fewer methods
    parent_ids = {p.info.run_id for p in parents}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parent_ids]
    assert sorted(r.data.tags["gems.compare_label"] for r in children) == [
        "adamw", "adamw+flow", "dpmoe", "galore", "gems", "lora"]
    for child in children:
        assert "test/search/full/ndcg_at_10" in child.data.metrics
        assert "retention/kl" in child.data.metrics
        assert 0.0 <= child.data.metrics["test/bm25_fusion_weight"] <= 1.0
        assert "test_bm25_fusion/search/full/ndcg_at_10" in child.data.metrics
        if child.data.tags["gems.compare_label"] in ("gems", "adamw"):
            steps = client.get_metric_history(child.info.run_id, "train/conflict_before_mean_rho")
            assert len(steps) >= 2, child.data.tags["gems.compare_label"]


def test_an_output_directory_never_mixes_two_configs(tmp_path: Path) -> None:
    from tune.study.run import check_resumable

    cfg = load_config("tiny")
    check_resumable(tmp_path, cfg, resume=True)
    check_resumable(tmp_path, cfg, resume=True)  # same config: resumable
    other = load_config("tiny", ["eval.max_examples=4"])
    with pytest.raises(ValueError, match="another config"):
        check_resumable(tmp_path, other, resume=True)
    check_resumable(tmp_path, other, resume=False)  # --no-resume starts over with the new key
    check_resumable(tmp_path, other, resume=True)
