"""The per-worker training loop that Ray Train runs on every worker (rank) of a TorchTrainer.

It wires the library together (backbone + item tokens, mixed-task batches, method, schedule,
``gems.step.train_step``) and adds only what distributed training needs: identical seeding and
precision on every rank, DDP, reports to Ray Train, checkpoints written by rank 0, resumption
from the latest checkpoint (after a worker failure or an explicit ``--resume``), and a
deterministic fault injection for tests. Data arrives through ``ray.train.get_dataset_shard``:
every rank gets the whole (small) prompt table and takes its own slice of each global batch
(:mod:`gems.batching`), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from gems.batching import LazyEncoded, MixedTaskBatcher, TokenizedExample, collate_left_padded
from gems.checkpoint import TrainerState, load_training_checkpoint, save_training_checkpoint
from gems.compile import compile_decoder_layers
from gems.config import Config
from gems.costs import optimizer_state_mb, peak_rss_gb
from gems.dpmoe_method import DPMoEMethod, collate_dual_view, dual_view_encoder
from gems.evaluate import evaluate_with_config
from gems.evaluate_fused import evaluate_with_bm25_fusion
from gems.flow_pass import base_losses, flow_example_weights
from gems.item_init import aligned_vectors, init_item_rows
from gems.methods import build_method
from gems.metrics import flatten_metrics
from gems.model import add_item_tokens, item_token_ids, load_backbone
from gems.nullspace import load_bases
from gems.precision import resolve_precision
from gems.prompts import encode_training_example
from gems.sasrec_vectors import load_item_vectors
from gems.schedule import build_lr_schedule, current_lr
from gems.speed_probe import forward_probe_seconds, machine_probe
from gems.step import StepStats, TaskBatch
from gems.target_loss import TargetLoss
from gems.tasks import TASKS
from gems.token_weighting import TokenWeighting
from tune.config import JobConfig

log = logging.getLogger(__name__)

TRAIN_COLUMNS = ["example_id", "task", "prompt", "target_item_id"]
CHECKPOINT_PREFIX = "checkpoint_step_"


# ------------------------------------------------------------------------------ rank helpers


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _from_rank0(value: Any) -> Any:
    """Every rank adopts rank 0's value (a probe's noisy verdict must not differ between ranks)."""
    if not _distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Same seed on every rank: any random op (e.g. a randomized SVD) then agrees across ranks."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 over all parameters in name order: equal digests = bit-identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _all_digests(model: torch.nn.Module) -> list[str]:
    digest = parameter_digest(model)
    if not _distributed():
        return [digest]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, digest)
    return [str(d) for d in out]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------- data


def dataset_frame(name: str, columns: list[str] | None = None) -> pl.DataFrame:
    """A whole (unsplit) Ray dataset given to this worker, as a polars frame."""
    shard = ray.train.get_dataset_shard(name)
    if shard is None:
        raise RuntimeError(f"the trainer was built without a {name!r} dataset")
    tables = [t for t in shard.iter_batches(batch_format="pyarrow", batch_size=4096) if t.num_rows]
    if not tables:
        raise ValueError(f"dataset {name!r} is empty")
    frame = pl.from_arrow(pa.concat_tables(tables, promote_options="default"))
    assert isinstance(frame, pl.DataFrame)
    return frame.select(columns) if columns else frame


def training_examples(train: pl.DataFrame, tokenizer: Any, max_len: int,
                      history_item_tokens: Mapping[str, Collection[int]] | None = None
                      ) -> dict[str, LazyEncoded[dict[str, Any]]]:
    """Per-task example lists in example_id order (independent of Ray Data's block order),
    tokenized lazily on first use; ``history_item_tokens`` (task -> the catalog's item token ids):
    that task's history items are targets too (``train.history_targets``)."""
    def encoder(task: str) -> Callable[[dict[str, Any]], TokenizedExample]:
        tokens = (history_item_tokens or {}).get(task)

        def encode(row: dict[str, Any]) -> TokenizedExample:
            ids, labels = encode_training_example(tokenizer, row["prompt"], row["target_item_id"],
                                                  max_len, tokens)
            return TokenizedExample(ids, labels)
        return encode

    return _per_task(train, encoder)


def _per_task(train: pl.DataFrame, encoder: Callable[[str], Callable[[dict[str, Any]], Any]]
              ) -> dict[str, LazyEncoded[dict[str, Any]]]:
    """Each task's rows in example_id order (independent of Ray Data's block order), encoded lazily
    by that task's encoder."""
    ordered = train.sort("example_id")
    return {task: LazyEncoded(ordered.filter(pl.col("task") == task).to_dicts(), encoder(task))
            for task in TASKS}


def dual_view_examples(train: pl.DataFrame, tokenizer: Any, max_len: int, items: pl.DataFrame,
                       title_words: int) -> dict[str, LazyEncoded[dict[str, Any]]]:
    """DPMoE's examples (both views of each prompt, history titles from ``items``, and the answer's
    catalog column), per task in example_id order, encoded lazily like :func:`training_examples`."""
    item_ids = [str(i) for i in items["item_id"].to_list()]
    titles = dict(zip(item_ids, items["title"].to_list(), strict=True))
    encode = dual_view_encoder(tokenizer, max_len, {item: i for i, item in enumerate(item_ids)}, titles,
                               title_words)
    return _per_task(train, lambda task: encode)


# ---------------------------------------------------------------------------------- metrics


class MetricWindow:
    """Averages step statistics between two reports; tokens/s over training time only."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.low: dict[str, float] = {}
        self.high: dict[str, float] = {}
        self.tokens = 0
        self.padded = 0
        self.steps = 0
        self.seconds = 0.0

    def add(self, stats: StepStats, tokens: int, padded: int, seconds: float) -> None:
        for key, value in stats.as_metrics().items():
            if value is not None and math.isfinite(value):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1
                if key.startswith("gate_"):  # the gate's range shows whether it moves at all
                    self.low[key] = min(self.low.get(key, math.inf), float(value))
                    self.high[key] = max(self.high.get(key, -math.inf), float(value))
        self.tokens += tokens
        self.padded += padded
        self.steps += 1
        self.seconds += seconds

    def flush(self, world_size: int) -> dict[str, float]:
        out = {f"train/{k}": self.sums[k] / self.counts[k] for k in self.sums}
        out.update({f"train/{k}_min": v for k, v in self.low.items()})
        out.update({f"train/{k}_max": v for k, v in self.high.items()})
        if self.steps:
            out["train/tokens_per_step"] = self.tokens / self.steps
            out["train/padding_share"] = 1.0 - self.tokens / self.padded if self.padded else 0.0
        if self.seconds > 0:
            # Every rank processes the same batch layout, so global throughput = world x local.
            out["train/tokens_per_s"] = world_size * self.tokens / self.seconds
            out["train/step_time_s"] = self.seconds / max(self.counts.get("loss", 1), 1)
        self.reset()
        return out


def _batch_tokens(batches: Mapping[str, list[Any]]) -> tuple[int, int]:
    """(real tokens, tokens incl. padding) of one step's micro-batches (both views of DPMoE's)."""
    counts = [mb.tokens for mbs in batches.values() for mb in mbs]
    return sum(c[0] for c in counts), sum(c[1] for c in counts)


# ------------------------------------------------------------------------------ checkpoints


@contextmanager
def _staged_checkpoint(rank: int, **save_kwargs: Any) -> Iterator[ray.train.Checkpoint | None]:
    """Rank 0 writes the checkpoint into a temporary dir that Ray Train then persists."""
    if rank != 0:
        yield None
        return
    tmp = Path(tempfile.mkdtemp(prefix="gems-ckpt-"))
    try:
        save_training_checkpoint(tmp / "ckpt", **save_kwargs)
        yield ray.train.Checkpoint.from_directory(str(tmp / "ckpt"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _maybe_fail(step: int, rank: int, fail_at_step: int | None, marker: str | None) -> None:
    """Fault injection: rank 0 dies (hard, like a killed process) once, at ``fail_at_step``."""
    if fail_at_step is None or rank != 0 or step != fail_at_step or marker is None:
        return
    path = Path(marker)
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"worker killed at step {step}\n")
    log.warning("fault injection: killing rank 0 at step %d", step)
    os._exit(1)


HOLD_AT_STEP_ENV, HOLD_DIR_ENV = "GEMS_TEST_HOLD_AT_STEP", "GEMS_TEST_HOLD_DIR"


def _maybe_hold(step: int, rank: int) -> None:
    """Test hook for losing a node mid-run (tests/e2e/test_multinode.py): with GEMS_TEST_HOLD_AT_STEP
    and GEMS_TEST_HOLD_DIR set, every rank stops once before that step, writes ``hold-rank<r>``
    (its node id) and waits for ``release`` in that dir, so a test can kill a node at a known step.
    A restarted rank finds its marker and goes on."""
    at, where = os.environ.get(HOLD_AT_STEP_ENV), os.environ.get(HOLD_DIR_ENV)
    if not at or not where or step != int(at):
        return
    marker = Path(where) / f"hold-rank{rank}"
    if marker.exists():
        return
    marker.write_text(ray.get_runtime_context().get_node_id())
    log.warning("test hook: rank %d holds before step %d", rank, step)
    while not (Path(where) / "release").exists():
        time.sleep(0.2)


# -------------------------------------------------------------------------------- the loop


def _load_model_with_items(cfg: Config, rank: int, vectors_path: str | None = None
                           ) -> tuple[Any, Any, pl.DataFrame, list[int]]:
    """Backbone + the catalog's item tokens (sorted by item id: the same token ids on all ranks),
    their rows started from collaborative vectors when ``items.init`` asks for it; and the items
    table in that order (BM25 of the val search rows reads its text)."""
    # Rank 0 first: it may build the backbone cache (dequantized SmolLM2) that the others reuse.
    if rank == 0:
        model, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    _barrier()
    if rank != 0:
        model, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    items = dataset_frame("items").sort("item_id")
    item_ids = [str(i) for i in items["item_id"].to_list()]
    new_ids = add_item_tokens(model, tokenizer, list(zip(item_ids, items["title"].to_list(), strict=True)))
    if cfg.items.init != "title":
        if vectors_path is None:
            raise ValueError(f"items.init={cfg.items.init} needs collaborative item vectors; the trainer "
                             "builds them (tune.train.item_vectors)")
        vectors, vector_ids = load_item_vectors(vectors_path)
        init_item_rows(model, new_ids, aligned_vectors(vectors, vector_ids, item_ids), cfg.items.init,
                       cfg.items.collab_ridge, cfg.items.collab_map)
    return model, tokenizer, items, new_ids


def _checkpoint_to_resume(loop_config: Mapping[str, Any]) -> ray.train.Checkpoint | None:
    """The run's latest checkpoint (after a failure), else the one given by ``--resume``."""
    latest = ray.train.get_checkpoint()
    if latest is None and loop_config.get("resume_from"):
        return ray.train.Checkpoint(loop_config["resume_from"])
    return latest


def _flow_pass(model: torch.nn.Module, batcher: MixedTaskBatcher, steps: int, loss: TargetLoss,
               autocast_dtype: torch.dtype | None, batch_size: int, tau: float | None) -> dict[str, Any]:
    """FLOW's weights from the untrained model (JSON-able: they go into every checkpoint, so a resumed
    run reuses them instead of scoring with an already trained model)."""
    started = time.perf_counter()
    weights, taus = flow_example_weights(base_losses(model, batcher, steps, loss, autocast_dtype, batch_size),
                                         tau)
    seconds = time.perf_counter() - started
    log.info("FLOW: scored the run's examples before training in %.0f s (tau %s)", seconds, taus)
    return {"weights": {t: w.tolist() for t, w in weights.items()}, "tau": taus, "seconds": seconds}


def _agreed_precision(setting: str, device: torch.device, rank: int,
                      saved: Mapping[str, Any] | None) -> tuple[torch.dtype | None, dict[str, Any]]:
    """Rank 0 decides and every rank adopts it (mixed precisions would desync replicas); a resumed
    ``auto`` run keeps the choice it started with, so the continuation stays exact."""
    if rank != 0:
        return _from_rank0(None)
    if setting == "auto" and saved and saved.get("precision") in ("bf16", "fp32"):
        choice = (torch.bfloat16 if saved["precision"] == "bf16" else None,
                  {**saved, "precision_reason": f"resumed: {saved.get('precision_reason', '')}"})
    else:
        choice = resolve_precision(setting, device)  # type: ignore[arg-type]
    return _from_rank0(choice)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any]:
    """Entry point given to ``TorchTrainer``; returns (on rank 0) the run's metric history."""
    cfg = JobConfig.model_validate(loop_config["cfg"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(tc.torch_threads or max(1, int(tc.cpus_per_worker)))
    # the worker reads a few small tables once; their bars would repaint around every progress line
    ray.data.DataContext.get_current().enable_progress_bars = False
    seed_everything(tc.seed)

    vectors_path = loop_config.get("item_vectors_path")
    model, tokenizer, items, new_ids = _load_model_with_items(cfg, rank, vectors_path)
    item_ids = [str(i) for i in items["item_id"].to_list()]
    model.to(device)
    bases = load_bases(Path(loop_config["bases_path"])) if loop_config.get("bases_path") else None
    # item_token_ids (catalog order): the catalog loss's candidates, the rows with their own lr,
    # and LoRA's trainable item rows (peft trainable_token_indices).
    method = build_method(model, cfg.gems, tc.lr, bases, item_token_ids=new_ids, loss=tc.loss,
                          item_lr_scale=tc.item_lr_scale, item_weight_decay=tc.item_weight_decay,
                          item_decay_to=tc.item_decay_to, history_weight=tc.history_targets,
                          weighting=TokenWeighting(tc.token_weighting, tc.weighting_tau, tc.weighting_norm),
                          dpmoe=cfg.dpmoe,
                          item_titles=dict(zip(item_ids, items["title"].to_list(), strict=True)))
    train_model: torch.nn.Module = method.model
    if tc.compile:
        log.info("compiled %d decoder layers (the first step pays for compilation)",
                 compile_decoder_layers(train_model))
    if world > 1:
        train_model = ray.train.torch.prepare_model(train_model)
    schedule = build_lr_schedule(method.optimizer, tc.warmup_steps, tc.max_steps)

    history_tokens = ({t: frozenset(int(i) for i in new_ids) for t in tc.history_target_tasks}
                      if tc.history_targets > 0 else None)
    train_rows = dataset_frame("train", TRAIN_COLUMNS)
    dual_view = isinstance(method, DPMoEMethod)
    examples = (dual_view_examples(train_rows, tokenizer, tc.max_seq_len, items, cfg.dpmoe.title_words)
                if dual_view else
                training_examples(train_rows, tokenizer, tc.max_seq_len, history_tokens))
    # Prompt characters stand in for token counts when grouping by length: no tokenization upfront.
    lengths = {task: [len(row["prompt"]) for row in rows.rows] for task, rows in examples.items()}
    batcher = MixedTaskBatcher(examples, batch_size=tc.batch_size, search_fraction=tc.search_fraction,
                               grad_accum=tc.grad_accum, seed=tc.seed,
                               pad_token_id=int(tokenizer.pad_token_id), rank=rank, world_size=world,
                               lengths=lengths, bucket_steps=tc.length_bucket_steps,
                               collate=collate_dual_view if dual_view else collate_left_padded)
    val = dataset_frame("val") if rank == 0 else None
    val_token_ids = item_token_ids(tokenizer, item_ids)

    start_step, history, saved_precision, saved_flow = 0, [], None, None
    resumed = _checkpoint_to_resume(loop_config)
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            state = load_training_checkpoint(Path(ckpt_dir), model=_unwrap(train_model),
                                             optimizer=method.optimizer, scheduler=schedule)
        start_step = batcher.resume_step(state.data_position)
        history = list(state.extra.get("history", []))
        saved_precision = state.extra.get("precision")
        saved_flow = state.extra.get("flow")
        log.info("rank %d resumed at step %d from %s", rank, start_step, resumed.path)
    autocast_dtype, precision = _agreed_precision(tc.precision, device, rank, saved_precision)
    flow: dict[str, Any] = {}
    if tc.token_weighting == "flow":
        if resumed is not None and saved_flow is None:
            raise ValueError(f"train.token_weighting=flow cannot resume from {resumed.path}: the checkpoint "
                             "holds no FLOW weights (written by a run without flow), and the model in it "
                             "is no longer the untrained one they must come from")
        flow = (dict(saved_flow) if saved_flow is not None else
                _flow_pass(_unwrap(train_model), batcher, tc.max_steps, method.target_loss, autocast_dtype,
                           cfg.eval.batch_size, tc.weighting_tau))
        batcher.set_example_weights({t: np.asarray(w) for t, w in flow["weights"].items()})

    window = MetricWindow()
    probe_batch = next(iter(batcher.batches_at(0).values()))[0]  # one fixed micro-batch, resume-safe
    for step in range(start_step, tc.max_steps):
        _maybe_fail(step + 1, rank, tc.fail_at_step, loop_config.get("fault_marker"))
        _maybe_hold(step + 1, rank)
        done = step + 1
        is_report = done % tc.report_every == 0 or done == tc.max_steps
        is_eval = done == tc.max_steps or bool(tc.eval_every and done % tc.eval_every == 0)
        is_ckpt = done % tc.checkpoint_every == 0 or done == tc.max_steps
        batches = batcher.batches_at(step)
        started = time.perf_counter()
        stats = method.train_step(batches, tc.max_grad_norm, autocast_dtype,
                                  measure_conflict=is_report or is_eval or is_ckpt, model=train_model)
        schedule.step()
        real_tokens, padded_tokens = _batch_tokens(batches)
        window.add(stats, real_tokens, padded_tokens, time.perf_counter() - started)
        if not (is_report or is_eval or is_ckpt):
            continue
        metrics: dict[str, Any] = {"step": done, "train/lr": current_lr(schedule),
                                   "train/precision_bf16": float(autocast_dtype is not None),
                                   "train/torch_threads": float(torch.get_num_threads()),
                                   "train/trainable_params": float(method.trainable_parameters()),
                                   "train/optimizer_state_mb": optimizer_state_mb(method.optimizer),
                                   "train/peak_rss_gb": peak_rss_gb(), **window.flush(world)}
        metrics.update({f"train/flow_tau_{t}": v for t, v in flow.get("tau", {}).items()})
        if "seconds" in flow:
            metrics["train/flow_pass_s"] = flow["seconds"]
        if tc.speed_probes and isinstance(probe_batch, TaskBatch):  # the probe runs the plain LM
            metrics.update({**machine_probe(device), "train/probe_forward_s": forward_probe_seconds(
                _unwrap(train_model), probe_batch, autocast_dtype)})
        if is_eval and val is not None:
            val_start = time.perf_counter()
            metrics.update(_evaluate(_unwrap(train_model), tokenizer, val, items, val_token_ids, cfg,
                                     autocast_dtype))
            metrics["train/val_seconds"] = time.perf_counter() - val_start
        if done == tc.max_steps:
            digests = _all_digests(_unwrap(train_model))
            metrics["train/replicas_identical"] = float(len(set(digests)) == 1)
        if rank == 0:
            history.append(metrics)
            # Through logging, not print: Train V2 patches print() to log *and* echo, so each line
            # reached the driver twice; the worker's root logger reaches it once.
            log.info(progress_line(metrics, tc.max_steps))
        state = TrainerState(step=done, data_position=batcher.position(done),
                             extra={"history": history, "precision": precision,
                                    **({"flow": flow} if flow else {})})
        if is_ckpt:
            with _staged_checkpoint(rank, model=_unwrap(train_model), tokenizer=tokenizer,
                                    optimizer=method.optimizer, scheduler=schedule,
                                    state=state) as checkpoint:
                ray.train.report(metrics, checkpoint=checkpoint,
                                 checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{done:06d}")
        else:
            ray.train.report(metrics)
    return {"history": history, "precision": precision,
            "parameter_digest": parameter_digest(_unwrap(train_model))}


def progress_line(metrics: Mapping[str, Any], max_steps: int) -> str:
    """One line per report, so a long run is never silent: loss per task, speed, val NDCG@10."""
    parts = [f"step {metrics['step']}/{max_steps}"]
    for key, label in (("train/loss", "loss"), ("train/loss_search", "search"), ("train/loss_rec", "rec"),
                       ("train/step_time_s", "s/step"), ("val/search/full/ndcg_at_10", "val search NDCG@10"),
                       ("val/rec/full/ndcg_at_10", "val rec NDCG@10")):
        if isinstance(metrics.get(key), int | float):
            parts.append(f"{label} {metrics[key]:.4g}")
    return " | ".join(parts)


def _evaluate(model: torch.nn.Module, tokenizer: Any, val: pl.DataFrame, items: pl.DataFrame,
              token_ids: torch.Tensor, cfg: Config, train_dtype: torch.dtype | None) -> dict[str, float]:
    """Val metrics; unified = mean NDCG@10 of the ranking the model would serve: with
    ``eval.bm25_fusion`` its search rows fused with BM25 (``val/model/*``: the model alone,
    ``val/bm25_weight``: the weight chosen on these rows). ``eval.val_precision: train`` runs the
    body in the training's autocast dtype and the head in fp32 (bf16 logits would tie many items),
    ``fp32`` runs it all in fp32. Scoring restores the model's train mode itself."""
    dtype = train_dtype if cfg.eval.val_precision == "train" else None
    item_ids = [str(i) for i in items["item_id"].to_list()]
    if not cfg.eval.bm25_fusion:
        result = evaluate_with_config(model, tokenizer, val, item_ids, token_ids, cfg, progress=False,
                                      autocast_dtype=dtype)
        return {"val/unified": result.unified, **flatten_metrics(result.metrics, prefix="val/")}
    both = evaluate_with_bm25_fusion(model, tokenizer, val, val, items, item_ids, token_ids, cfg,
                                     autocast_dtype=dtype)
    return {"val/unified": both.fused.unified, **flatten_metrics(both.fused.metrics, prefix="val/"),
            "val/model/unified": both.plain.unified,
            **flatten_metrics(both.plain.metrics, prefix="val/model/"), "val/bm25_weight": both.weight}
