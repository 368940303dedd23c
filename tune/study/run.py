"""The quality study: every method on the same splits, budget and seeds, measured the same way.

For each LLM method (and ablation variant) and seed: Ray Train fine-tunes it (``tune.train.trainer``,
the same loop as the sweep), the final checkpoint is loaded back on the driver, ranked on TEST
under both protocols (full catalog, sampled negatives) with ``gems.evaluate``, and compared with
the untouched base model on general-domain text (``gems.retention``). The floors (popularity,
BM25) are scored on the same test rows by the same evaluator; so is SASRec (``sasrec``,
``sasrec-bm25``), trained on the driver on the train split once per seed, its epoch picked on val.
Each LLM run is a nested MLflow child run of one parent (params, per-step training metrics incl.
the gradient conflict coefficient, test and retention metrics, wall times); results.csv /
results.md / plots are rewritten after every finished run, so a long study that is interrupted
keeps what finished, and ``resume`` skips the (method, seed) pairs already in results.csv.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import polars as pl
import ray
import torch

from gems.checkpoint import load_model_weights
from gems.data.shards import read_items, read_manifest, read_split
from gems.dpmoe import DPMoEModel
from gems.dpmoe_config import DPMoEConfig
from gems.evaluate import evaluate_with_config, subsample_per_task
from gems.evaluate_fused import evaluate_with_bm25_fusion
from gems.floors import evaluate_floors
from gems.metrics import flatten_metrics
from gems.model import add_item_tokens, item_token_ids, load_backbone
from gems.nullspace import bases_for_run, save_bases
from gems.retention import retention_with_config
from gems.sasrec_config import SASRecConfig
from gems.sasrec_floor import evaluate_sasrec
from gems.tasks import TASKS
from tune.config import JobConfig
from tune.local_ray import init_address, local_runtime_env
from tune.registry.run_params import config_params
from tune.registry.tracking import log_run_context, parent_run, run_tags, setup_tracking
from tune.study import results as res
from tune.study.methods import MethodSpec, fused_label
from tune.study.ranks import write_ranks
from tune.train.trainer import run_training

log = logging.getLogger(__name__)


@dataclass
class ComparisonOutcome:
    out_dir: Path
    rows: list[res.Row]
    timings: list[res.Timing]
    files: dict[str, Path]
    parent_run_id: str
    skipped: list[str] = field(default_factory=list)  # (method, seed) pairs resumed from disk


# ------------------------------------------------------------------------------------- setup


def ensure_ray(cfg: JobConfig) -> None:
    """A local Ray big enough for one training run (workers x CPUs) if none is running."""
    if not ray.is_initialized():
        cpus = max(2, math.ceil(cfg.train.num_workers * cfg.train.cpus_per_worker))
        address = init_address()  # RAY_ADDRESS's cluster, else an instance of our own (tune.local_ray)
        local = address == "local"
        ray.init(address=address, num_cpus=cpus if local else None, include_dashboard=False,
                 runtime_env=local_runtime_env(False) if local else None)


def prepare_shards(cfg: JobConfig) -> tuple[Path, dict[str, Any]]:
    """Prompt shards for cfg.data: reused when their manifest was built from the same data config."""
    from tune.ingest.preprocess import run_preprocess

    shard_dir = cfg.resolve(cfg.data.output_dir)
    try:
        manifest = read_manifest(shard_dir)
        if manifest.get("config", {}).get("data") == cfg.data.model_dump(mode="json"):
            log.info("compare: reusing shards %s (fingerprint %s)", shard_dir,
                     str(manifest.get("fingerprint"))[:12])
            return shard_dir, manifest
    except (FileNotFoundError, ValueError, OSError):
        pass
    ensure_ray(cfg)
    return shard_dir, run_preprocess(cfg)


def study_key(cfg: JobConfig) -> str:
    """What results in one output directory must share (data, model, budget, evaluation)."""
    exclude = {"mlflow", "tune", "nightly", "name"}
    if cfg.sasrec == SASRecConfig():  # keys of studies written before the section existed stay valid
        exclude.add("sasrec")
    if cfg.dpmoe == DPMoEConfig():  # the same for the DPMoE section
        exclude.add("dpmoe")
    payload = cfg.model_dump(mode="json", exclude=exclude)
    payload["model"].pop("attention")  # a kernel choice (same scores, tested): speed, not a result
    for name in ("torch_threads", "placement_strategy", "worker_resources"):  # where and how fast, not what
        payload["train"].pop(name)
    if cfg.items.init == "title":  # the map of collaborative vectors is not used: keys stay valid
        payload["items"].pop("collab_map")
    if cfg.train.item_decay_to == "zero":  # the default of a later field: earlier keys stay valid
        payload["train"].pop("item_decay_to")
    if cfg.train.token_weighting == "none":  # later fields at their defaults: earlier keys stay valid
        for name in ("token_weighting", "weighting_tau", "weighting_norm"):
            payload["train"].pop(name)
    payload["eval"].pop("bm25_fusion")  # adds '+bm25' rows, changes no other row
    if cfg.eval.bm25_weight is None:  # a later field's default (the weight chosen on val): keys stay valid
        payload["eval"].pop("bm25_weight")
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def check_resumable(out_dir: Path, cfg: JobConfig, resume: bool) -> None:
    """Refuse to mix results of different configs in one directory (a resumed study would
    otherwise keep e.g. floors measured on other test rows); record the key of this study."""
    path = out_dir / "study_key.txt"
    key = study_key(cfg)
    if resume and path.is_file() and path.read_text().strip() != key:
        raise ValueError(f"{out_dir} holds results of another config (study key {path.read_text().strip()} "
                         f"!= {key}); use another --out or --no-resume to start over")
    path.write_text(key + "\n")


def catalog(shard_dir: Path) -> tuple[pl.DataFrame, list[str]]:
    """Items in the order the training loop adds their tokens (sorted by id)."""
    items = read_items(shard_dir).sort("item_id")
    return items, [str(i) for i in items["item_id"].to_list()]


def bases_file(cfg: JobConfig, base_model: torch.nn.Module, tokenizer: Any) -> Path | None:
    """Null-space bases for a GEMS run (None when the run does not protect anything)."""
    if cfg.gems.method != "gems" or (cfg.gems.k == 0 and cfg.gems.energy is None):
        return None
    cache = cfg.resolve("cache/nullspace")
    bases = bases_for_run(base_model, tokenizer, cfg.gems, cache)
    cached = bases.info.get("cache")
    if cached and cached != "none" and Path(cached).is_file():
        return Path(cached)
    path = cache / f"compare-{uuid.uuid4().hex[:8]}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_bases(bases, path)
    return path


def load_tuned(cfg: JobConfig, checkpoint: Path, items: pl.DataFrame) -> tuple[torch.nn.Module, Any]:
    """The fine-tuned model from a training checkpoint, built exactly as the worker built it."""
    model, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    add_item_tokens(model, tokenizer, list(zip(items["item_id"].to_list(), items["title"].to_list(),
                                               strict=True)))
    if cfg.gems.method == "lora":
        from peft import PeftModel  # the adapter config says exactly how the worker wrapped it

        model = PeftModel.from_pretrained(model, str(checkpoint / "model")).merge_and_unload()
    elif cfg.gems.method == "dpmoe":
        ids = [str(i) for i in items["item_id"].to_list()]
        model = DPMoEModel(model, cfg.dpmoe, cfg.gems.target_modules, item_token_ids(tokenizer, ids),
                           dict(zip(ids, items["title"].to_list(), strict=True)))
        load_model_weights(model, checkpoint)
    else:
        load_model_weights(model, checkpoint)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ running


def _floor_rows(cfg: JobConfig, shard_dir: Path, test: pl.DataFrame, items: pl.DataFrame,
                item_ids: list[str], specs: Sequence[MethodSpec], out_dir: Path
                ) -> tuple[list[res.Row], list[res.Timing]]:
    wanted = {s.method for s in specs if s.kind == "floor"}
    started = time.perf_counter()
    results = evaluate_floors(read_split(shard_dir, "train"), test, items, item_ids,
                              batch_size=cfg.eval.batch_size, mask_history_rec=cfg.eval.mask_history_rec,
                              num_negatives=cfg.eval.num_negatives, seed=cfg.data.seed, ks=cfg.eval.ks,
                              top_k=1, progress=False)
    elapsed = time.perf_counter() - started
    for name, result in results.items():
        if name in wanted:
            write_ranks(out_dir, name, cfg.data.seed, result.top_k)
    rows = [r for name, result in results.items() if name in wanted
            for r in res.ranking_rows(name, cfg.data.seed, result.metrics)]
    timings = [res.Timing(name, cfg.data.seed, 0, 0.0, elapsed, 0.0, elapsed, math.nan)
               for name in results if name in wanted]
    return rows, timings


def _sasrec_rows(cfg: JobConfig, shard_dir: Path, test: pl.DataFrame, items: pl.DataFrame,
                 item_ids: list[str], specs: Sequence[MethodSpec], seed: int, out_dir: Path
                 ) -> tuple[list[res.Row], list[res.Timing], str]:
    """Fit SASRec on train (epoch picked on all val rows) with ``seed``, rank ``test``; one fit
    serves both sasrec and sasrec-bm25 (each one's timing carries the whole fit)."""
    started = time.perf_counter()
    outcome = evaluate_sasrec(read_split(shard_dir, "train"), read_split(shard_dir, "val"), test, items,
                              item_ids, cfg.sasrec, train_seed=seed, methods=[s.method for s in specs],
                              batch_size=cfg.eval.batch_size, mask_history_rec=cfg.eval.mask_history_rec,
                              num_negatives=cfg.eval.num_negatives, seed=cfg.data.seed, ks=cfg.eval.ks,
                              top_k=1, progress=False)
    fit = outcome.fit
    labels = {s.method: s.label for s in specs}
    for name, result in outcome.results.items():
        write_ranks(out_dir, labels[name], seed, result.top_k)
    rows = [r for name, result in outcome.results.items()
            for r in res.ranking_rows(labels[name], seed, result.metrics)]
    step_s = fit.seconds / fit.steps if fit.steps else math.nan
    timings = [res.Timing(labels[name], seed, fit.steps, fit.seconds, outcome.eval_seconds[name], 0.0,
                          fit.seconds + outcome.eval_seconds[name], step_s) for name in outcome.results]
    key = f"sasrec/seed{seed}"
    if mlflow.active_run() is not None:  # the study's parent run
        mlflow.log_metrics({f"{key}/best_epoch": fit.best_epoch, f"{key}/epochs": fit.epochs,
                            f"{key}/val_ndcg_at_10": fit.best_val, f"{key}/fit_s": fit.seconds,
                            **({f"{key}/fusion_weight": outcome.fusion_weight}
                               if outcome.fusion_weight is not None else {})})
    summary = (f"best epoch {fit.best_epoch} of {fit.epochs} (val NDCG@10 {fit.best_val:.4f}), fusion "
               f"weight {outcome.fusion_weight}, {time.perf_counter() - started:.0f} s")
    return rows, timings, summary


def _numeric(d: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)
            and math.isfinite(float(v)) and k != "step"}


def _run_llm(cfg: JobConfig, spec: MethodSpec, seed: int, shard_dir: Path, test: pl.DataFrame,
             items: pl.DataFrame, item_ids: list[str], base_model: torch.nn.Module, base_tokenizer: Any,
             keep_checkpoints: bool, out_dir: Path) -> tuple[list[res.Row], list[res.Timing], list[dict]]:
    """Train one method/seed on Ray Train, evaluate it on test (and fused with BM25 when
    cfg.eval.bm25_fusion), measure retention; log to MLflow. One timing per reported label."""
    run_cfg = spec.config(cfg, seed)
    started = time.perf_counter()
    bases_path = bases_file(run_cfg, base_model, base_tokenizer)
    run_name = f"{cfg.name}-compare-{res.safe_name(spec.label)}-s{seed}-{uuid.uuid4().hex[:6]}"
    # val curves stay the model's own (the learning being compared); fusion is a test-time row here
    train_cfg = run_cfg.model_copy(update={"eval": run_cfg.eval.model_copy(update={"bm25_fusion": False})})
    outcome = run_training(train_cfg, shard_dir, bases_path, run_name)
    train_s = time.perf_counter() - started
    if outcome.checkpoint_path is None:
        raise RuntimeError(f"{spec.label} seed {seed}: training produced no local checkpoint")
    t0 = time.perf_counter()
    tuned, tokenizer = load_tuned(run_cfg, outcome.checkpoint_path, items)
    token_ids = item_token_ids(tokenizer, item_ids)
    fusion: dict[str, float] = {}
    if run_cfg.eval.bm25_fusion:
        both = evaluate_with_bm25_fusion(tuned, tokenizer, test, read_split(shard_dir, "val"), items,
                                         item_ids, token_ids, run_cfg, top_k=1)
        results = {spec.label: both.plain, fused_label(spec.label): both.fused}
        fusion = {"test/bm25_fusion_weight": both.weight,
                  **{f"val/bm25_fusion_ndcg_at_10_w{w:.2f}": v for w, v in both.val_ndcg.items()}}
    else:
        results = {spec.label: evaluate_with_config(tuned, tokenizer, test, item_ids, token_ids, run_cfg,
                                                    top_k=1, progress=False)}
    eval_s = time.perf_counter() - t0
    rows: list[res.Row] = []
    for label, result in results.items():
        write_ranks(out_dir, label, seed, result.top_k)
        rows += res.ranking_rows(label, seed, result.metrics)
    t1 = time.perf_counter()
    retention = None
    if run_cfg.eval.retention:  # one model: a '+bm25' row shares its retention
        # DPMoE's experts act only inside its two views: on plain text its backbone is the base model
        language_model = tuned.backbone if isinstance(tuned, DPMoEModel) else tuned
        retention = retention_with_config(base_model, language_model, tokenizer, run_cfg)
        rows += [r for label in results for r in res.retention_rows(label, seed, retention)]
    retention_s = time.perf_counter() - t1
    steps = [h["train/step_time_s"] for h in outcome.history if "train/step_time_s" in h]
    last = outcome.history[-1] if outcome.history else {}
    costs = {name: float(last.get(f"train/{name}", math.nan))
             for name in ("trainable_params", "optimizer_state_mb", "peak_rss_gb")}
    speeds = [h["train/tokens_per_s"] for h in outcome.history if "train/tokens_per_s" in h]
    costs["tokens_per_s"] = sum(speeds) / len(speeds) if speeds else math.nan
    timings = [res.Timing(label, seed, run_cfg.train.max_steps, train_s, eval_s, retention_s,
                          time.perf_counter() - started, sum(steps) / len(steps) if steps else math.nan,
                          **costs)
               for label in results]
    with mlflow.start_run(run_name=f"{spec.label} seed {seed}", nested=True,
                          tags={**run_tags(run_cfg, None), "gems.compare_label": spec.label,
                                "gems.overrides": ";".join(spec.overrides)}):
        mlflow.log_params({"method": spec.method, "seed": seed, "label": spec.label,
                           **config_params(run_cfg)})
        for h in outcome.history:
            mlflow.log_metrics(_numeric(h), step=int(h.get("step", 0)))
        mlflow.log_metrics({**flatten_metrics(results[spec.label].metrics, prefix="test/"),
                            **{k: v for label in results if label != spec.label
                               for k, v in flatten_metrics(results[label].metrics,
                                                           prefix="test_bm25_fusion/").items()},
                            **fusion,
                            **(retention.metrics() if retention else {}),
                            "time/train_s": train_s, "time/eval_s": eval_s, "time/retention_s": retention_s})
        if retention and retention.skipped:
            mlflow.set_tag("gems.retention_skipped", "; ".join(retention.skipped))
    del tuned
    if not keep_checkpoints:  # SmolLM2 checkpoints are ~1-2 GB each (weights + optimizer state)
        shutil.rmtree(outcome.run_path, ignore_errors=True)
    return rows, timings, outcome.history


def _study_header(cfg: JobConfig, command: str, manifest: dict[str, Any], test: pl.DataFrame,
                  seeds: Sequence[int]) -> str:
    tc = cfg.train
    counts = test.group_by("task").len().sort("task").iter_rows()
    return (f"# Comparison: {cfg.name}\n\nCommand: `{command}`\n\n"
            f"Backbone `{cfg.model.name_or_path}`; data `{cfg.data.source}` "
            f"(fingerprint {str(manifest.get('fingerprint', ''))[:12]}, counts {manifest.get('counts')}); "
            f"test rows evaluated: {dict(counts)}. Budget per LLM run: {tc.max_steps} steps x batch "
            f"{tc.batch_size} (search share {tc.search_fraction}), max {tc.max_seq_len} tokens, lr {tc.lr}, "
            f"seeds {list(seeds)}. Values: mean ± std over seeds (floors are deterministic). "
            f"Rec rankings mask history items: {cfg.eval.mask_history_rec}.\n")


def run_comparison(cfg: JobConfig, specs: Sequence[MethodSpec], out_dir: Path, seeds: Sequence[int],
                   command: str = "", resume: bool = True, keep_checkpoints: bool = False,
                   on_progress: Callable[[str], None] | None = None) -> ComparisonOutcome:
    """Run every spec x seed (floors once), writing results after each run; see module docstring."""
    say = on_progress or log.info
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_resumable(out_dir, cfg, resume)
    shard_dir, manifest = prepare_shards(cfg)
    items, item_ids = catalog(shard_dir)
    test = subsample_per_task(read_split(shard_dir, "test"), cfg.eval.max_examples, cfg.data.seed)
    # A resumed directory keeps every method already in it (an ablation added by a second command
    # must not drop the first command's results); earlier methods are listed first.
    rows = res.read_rows(out_dir / "results.csv") if resume else []
    timings = res.read_timings(out_dir / "timings.csv") if resume else []
    histories = res.read_histories(out_dir) if resume else {}
    labels = [s.label for s in specs]
    fused = [fused_label(s.label) for s in specs if s.is_llm and cfg.eval.bm25_fusion]
    order = list(dict.fromkeys([*(r.method for r in rows), *labels, *fused]))
    done = {(r.method, r.seed) for r in rows}
    header = _study_header(cfg, command, manifest, test, seeds)

    def publish() -> dict[str, Path]:
        files = res.write_results(out_dir, rows, timings, order, header, cfg.eval.num_negatives)
        files.update(res.write_plots(out_dir, rows, order, histories))
        for path in files.values():
            mlflow.log_artifact(str(path), artifact_path="comparison")
        return files

    experiment_id = setup_tracking(cfg)
    tags = {**run_tags(cfg, manifest), "gems.pipeline": "compare", "gems.methods": ",".join(labels)}
    skipped: list[str] = []
    with parent_run(f"{cfg.name}-compare", tags) as parent:
        log_run_context(cfg, manifest, shard_dir)
        mlflow.log_params({"methods": ",".join(labels)[:500], "seeds": ",".join(map(str, seeds)),
                           "experiment_id": experiment_id, "command": command[:500],
                           **config_params(cfg)})  # the shared budget; each child has its own
        files = publish()
        floors = [s for s in specs if s.kind == "floor" and (s.method, cfg.data.seed) not in done]
        if floors:
            floor_rows, floor_timings = _floor_rows(cfg, shard_dir, test, items, item_ids, floors, out_dir)
            rows += floor_rows
            timings += floor_timings
            say(f"floors {[s.label for s in floors]} done")
            files = publish()
        sasrec = [s for s in specs if s.kind == "sasrec"]
        for seed in seeds if sasrec else []:  # small: trained on the driver, before the LLM runs
            todo = [s for s in sasrec if (s.label, seed) not in done]
            skipped += [f"{s.label} seed {seed}" for s in sasrec if (s.label, seed) in done]
            if todo:
                say(f"{[s.label for s in todo]} seed {seed}: training SASRec")
                sas_rows, sas_timings, summary = _sasrec_rows(cfg, shard_dir, test, items, item_ids,
                                                              todo, seed, out_dir)
                rows += sas_rows
                timings += sas_timings
                say(f"{[s.label for s in todo]} seed {seed}: {summary}")
                files = publish()
        llm = [s for s in specs if s.is_llm]
        if llm:
            ensure_ray(cfg)
            base_model, base_tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
            for seed in seeds:  # seed-major: a study cut short still has every method for seed 0
                for spec in llm:
                    if (spec.label, seed) in done:
                        skipped.append(f"{spec.label} seed {seed}")
                        continue
                    say(f"{spec.label} seed {seed}: training")
                    run_rows, run_timings, history = _run_llm(
                        cfg, spec, seed, shard_dir, test, items, item_ids, base_model, base_tokenizer,
                        keep_checkpoints, out_dir)
                    rows += run_rows
                    timings += run_timings
                    timing = run_timings[0]
                    histories[(spec.label, seed)] = history
                    res.write_history(out_dir, spec.label, seed, history)
                    files = publish()
                    say(f"{spec.label} seed {seed}: done in {timing.total_s:.0f} s "
                        f"(train {timing.train_s:.0f}, eval {timing.eval_s:.0f}, "
                        f"retention {timing.retention_s:.0f})")
        return ComparisonOutcome(out_dir, rows, timings, files, parent.info.run_id, skipped)


def expected_metrics(spec: MethodSpec, retention: bool) -> set[tuple[str, str, str]]:
    """(task, metric, protocol) every run of ``spec`` must produce (the smoke test's contract)."""
    tasks = ("search",) if spec.method == "bm25" else TASKS
    out = {(t, m, p) for t in tasks for m in res.RANKING_METRICS for p in ("full", "sampled")}
    if spec.is_llm and retention:
        out |= {("general", m, res.RETENTION) for m in res.RETENTION_METRICS}
    return out
