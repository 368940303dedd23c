"""Typed, validated configuration: the library's sections (data, model, items, gems, train, eval,
sasrec) and the loader every job's config goes through.

One YAML file (under ``pipelines/configs/``) holds a job's sections; ``--set a.b=value`` overrides
any field. Validation happens at load time so a bad value fails in seconds, naming the field, the
value and the allowed range, instead of hours later inside a Ray worker. The sections of the Ray
Tune, MLflow and nightly layer (tune, mlflow, nightly) live with it, in ``tune/config.py``, whose
``JobConfig`` extends ``Config`` and is validated with it in one pass (``validate_config``).
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gems.dpmoe_config import DPMoEConfig
from gems.sasrec_config import SASRecConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = PROJECT_ROOT / "pipelines" / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names every offending field."""


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    source: Literal["synthetic", "events", "qilin", "amazon"] = Field(
        "synthetic", description="Where raw logs come from: the simulator, contract-format event "
        "files (JSONL/Parquet, optionally dt=YYYY-MM-DD partitioned), Qilin CSVs or Amazon LC-Rec JSON.")
    path: str | None = Field(None, description="Input events (file or directory); for synthetic, "
                             "where simulated logs are written. Relative paths resolve against state_dir.")
    items_path: str | None = Field(None, description="Item table (JSONL/Parquet) for source=events.")
    output_dir: str = Field("shards", description="Where prompt shards, quarantine and manifest go "
                            "(relative to state_dir).")
    synthetic_users: int = Field(200, ge=1, le=10_000_000, description="Simulated users.")
    synthetic_items: int = Field(300, ge=2, le=1_000_000, description="Simulated catalog size.")
    synthetic_days: int = Field(1, ge=1, le=365, description="Simulated day partitions.")
    synthetic_events_per_user_day: float = Field(
        12.0, gt=0, le=1000, description="Mean events per user per day in the simulator.")
    seed: int = Field(0, ge=0, description="Seed for simulation, subsetting and negative sampling.")
    max_users: int | None = Field(None, ge=1, description="Seeded user subset (None = all users).")
    history_len: int = Field(10, ge=1, le=200, description="H: previous clicked items in a prompt.")
    title_max_words: int = Field(6, ge=0, le=64, description="Words of each history item's title "
                                 "shown beside its token (0 = tokens only).")
    query_max_chars: int = Field(256, ge=8, le=100_000, description="Longer queries are truncated "
                                 "(and counted in the manifest).")
    future_ts_tolerance_s: int = Field(86_400, ge=0, description="Events later than now + this are "
                                       "quarantined as ts_in_future.")
    split_mode: Literal["leave_one_out", "time_cut"] = Field(
        "leave_one_out", description="leave_one_out: per user and task, last -> test, second-last "
        "-> val. time_cut: train <= cut_day - 1, test on cut_day.")
    cut_day: str | None = Field(None, pattern=r"^\d{4}-\d{2}-\d{2}$",
                                description="Day (YYYY-MM-DD) evaluated in time_cut mode.")
    num_buckets: int = Field(16, ge=1, le=100_000, description="User hash buckets for per-user "
                             "sequence building (polars inside map_batches).")
    amazon_search_share: float = Field(0.5, ge=0, le=1, description="Share of Amazon interactions "
                                       "turned into search events (query from category + title).")
    amazon_query_title_words: int = Field(2, ge=0, le=5, description="Title words added to an Amazon "
                                          "query after its leaf category; 0 = category-only queries, "
                                          "where only the user's history tells items of a category apart.")
    now_ts: int | None = Field(None, ge=0, description="Reference 'now' (unix s) for the "
                               "ts_in_future check; None = wall clock at the start of the run. Set "
                               "it to re-run old logs reproducibly.")
    concurrency: int = Field(2, ge=1, le=1024, description="Concurrent Ray Data tasks per "
                             "preprocessing stage (each holds one input file or one user bucket).")

    @field_validator("cut_day", mode="before")
    @classmethod
    def _day_as_text(cls, value: Any) -> Any:
        """YAML (and --set) read 2025-01-02 as a date; the field holds the YYYY-MM-DD text."""
        return value.isoformat() if isinstance(value, date) else value

    @model_validator(mode="after")
    def _time_cut_needs_day(self) -> DataConfig:
        if self.split_mode == "time_cut" and self.cut_day is None:
            raise ValueError("data.cut_day is required when data.split_mode is time_cut")
        return self


class TinyLlamaConfig(Section):
    hidden_size: int = Field(64, ge=8, le=4096, description="Tiny test model width.")
    intermediate_size: int = Field(128, ge=8, le=16384, description="Tiny test model MLP width.")
    num_hidden_layers: int = Field(2, ge=1, le=64, description="Tiny test model depth.")
    num_attention_heads: int = Field(4, ge=1, le=64, description="Attention heads.")
    num_key_value_heads: int = Field(2, ge=1, le=64, description="KV heads (GQA).")
    seed: int = Field(0, ge=0, description="Seed of the random initialisation.")
    tie_word_embeddings: bool = Field(True, description="Share input embeddings and LM head (as "
                                      "SmolLM2 does); False exercises the untied-head code paths.")

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyLlamaConfig:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"model.tiny.hidden_size {self.hidden_size} must be divisible by "
                             f"model.tiny.num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model.tiny.num_attention_heads {self.num_attention_heads} must be "
                             f"divisible by model.tiny.num_key_value_heads {self.num_key_value_heads}")
        return self


class ModelConfig(Section):
    name_or_path: str = Field(..., min_length=1, description="A local Hugging Face causal-LM "
                              "directory, 'smollm2-135m' (embedded GGUF, cached as safetensors) or "
                              "'tiny-llama' (random, for tests).")
    cache_dir: str = Field("cache/models", description="Dequantized backbone cache (relative to "
                           "state_dir).")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory.")
    chat_template: Literal["auto", "none"] = Field(
        "auto", description="auto: prompts are a user turn of the backbone's chat template (if it "
        "has one) WITHOUT the default system prompt some templates inject (SmolLM2's adds 30 "
        "identical tokens, a third of an average prompt's compute); none: plain text after BOS.")
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="Attention kernel. auto: eager on CPU (measured: torch's CPU flash-"
        "attention backward is slower than plain matmuls at prompt lengths of 40-130 tokens; a "
        "SmolLM2 bf16 step 1.39 s eager vs 1.60 s sdpa), sdpa where CUDA is available.")
    tiny: TinyLlamaConfig = Field(default_factory=TinyLlamaConfig,
                                  description="Shape of the tiny-llama test model.")

    @model_validator(mode="after")
    def _path_exists(self) -> ModelConfig:
        if (self.name_or_path not in ("smollm2-135m", "tiny-llama")
                and not Path(self.name_or_path).expanduser().is_dir()):
                raise ValueError(f"model.name_or_path: {self.name_or_path!r} is neither "
                                 "'smollm2-135m', 'tiny-llama' nor an existing model directory")
        return self


class ItemsConfig(Section):
    init: Literal["title", "collab", "title+collab"] = Field(
        "title", description="Where item-token rows start: the mean of the title's token embeddings "
        "(language knowledge), collaborative vectors of a SASRec trained on the same train split and "
        "mapped to the backbone's width by a map fitted onto the title rows (who-bought-what, as "
        "E4SRec/LLaRA bring ID recommenders into an LLM), or the mean of both.")
    collab_map: Literal["orthogonal", "ridge"] = Field(
        "orthogonal", description="Map from collaborative vectors to the backbone's width: a scaled "
        "rotation closest to the title rows (keeps which items go together) or a ridge fit onto "
        "them (keeps only what the vectors say about the titles).")
    collab_ridge: float = Field(1e-3, ge=0, le=100, description="Ridge strength of the ridge map "
                                "(relative).")


class GateWeights(Section):
    loss: float = Field(0.4, ge=0, le=1, description="Weight of each task's share of the loss.")
    grad_norm: float = Field(0.4, ge=0, le=1, description="Weight of the gradient-norm share.")
    samples: float = Field(0.2, ge=0, le=1, description="Weight of the sample share.")

    @model_validator(mode="after")
    def _not_all_zero(self) -> GateWeights:
        if self.loss + self.grad_norm + self.samples <= 0:
            raise ValueError("gems.gate_weights: at least one weight must be > 0")
        return self


class GEMSConfig(Section):
    method: Literal["gems", "adamw", "lora", "galore", "dpmoe"] = Field(
        "gems", description="Optimizer/method; baselines share data, prompts and evaluation. dpmoe: "
        "L2Rec's dual-view MoE-LoRA on the frozen backbone (settings in the dpmoe section).")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"],
        min_length=1, description="Name suffixes of the decoder nn.Linear weights GEMS projects.")
    r_shared: int = Field(16, ge=1, le=65_536, description="Rank of the shared subspace "
                          "(clamped to min(m, n) per weight).")
    r_search: int | None = Field(None, ge=1, le=65_536, description="Search subspace rank "
                                 "(default r_shared // 2).")
    r_rec: int | None = Field(None, ge=1, le=65_536, description="Rec subspace rank (default "
                              "r_shared // 2).")
    task_subspaces: bool = Field(True, description="False = single shared subspace (ablation).")
    complementary: bool = Field(True, description="Task bases computed from gradients with the "
                                "shared component removed (orthogonal to the shared basis).")
    t_svd: int = Field(200, ge=1, le=1_000_000, description="Steps between SVD basis refreshes.")
    moment_transfer: Literal["rotate", "keep", "reset"] = Field(
        "rotate", description="What happens to subspace Adam moments on a basis refresh.")
    alpha: float = Field(1.0, gt=0, le=1000, description="Scale of back-projected updates.")
    tau: float = Field(0.25, gt=0, le=1e6, description="Gate temperature: softmax(z / tau). The gate "
                       "logits are shares in [0, 1], so their gap is small: on Amazon Office (240 x 16) "
                       "the gate stayed within 0.44-0.56 at tau=1 (|z_s - z_r| <= 0.23); 0.25 lets the "
                       "same gaps move it within ~0.3-0.7 (docs/learning.md).")
    gate_weights: GateWeights = Field(default_factory=GateWeights,
                                      description="How the gate logits z mix task statistics.")
    fixed_gate: float | None = Field(None, ge=0, le=1, description="Ablation: fixed search gate "
                                     "(rec gets 1 - it) instead of the adaptive gate.")
    k: int = Field(32, ge=0, le=65_536, description="Protected general-domain directions per "
                   "layer (0 = no null-space projection); must be <= the layer's side dimension.")
    energy: float | None = Field(None, gt=0, lt=1, description="Instead of k: smallest k whose "
                                 "eigenvalues hold this share of the covariance energy.")
    nullspace_side: Literal["input", "output"] = Field("input", description="Protect the input "
                                                       "activation span (default) or output span.")
    general_corpus: str | None = Field(None, description="General-domain text for U_k; None = "
                                       "wikitext-2 valid from shared data if present, else text "
                                       "the base model generates from fixed prompts (cached).")
    general_max_tokens: int = Field(16_384, ge=128, le=100_000_000,
                                    description="Tokens of general text used to estimate U_k.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, le=1, description="Adam epsilon.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="Decoupled weight decay; on GEMS "
                                "target weights it is projected so the null-space invariant holds.")
    lora_r: int = Field(16, ge=1, le=4096, description="LoRA rank (method=lora).")
    lora_alpha: float = Field(32.0, gt=0, description="LoRA alpha (method=lora).")
    galore_scale: float = Field(0.25, gt=0, le=100, description="GaLore scale (method=galore); "
                                "its rank is r_shared and its update gap t_svd.")
    rank_threshold: float = Field(1e-3, ge=0, lt=1, description="A basis direction is kept only "
                                  "when its singular value is >= this share of the gradient's "
                                  "Frobenius norm: a subspace shrinks to what the gradient holds "
                                  "instead of filling up with float noise (0 = keep all).")
    svd: Literal["auto", "full", "randomized"] = Field(
        "auto", description="Basis refresh SVD: full (torch.linalg.svd), randomized (seeded range "
        "finder, ~10x cheaper), or auto = randomized when the rank is <= 1/4 of min(m, n).")

    @model_validator(mode="after")
    def _betas_in_range(self) -> GEMSConfig:
        for i, b in enumerate(self.betas):
            if not 0 <= b < 1:
                raise ValueError(f"gems.betas[{i}]: {b} is outside [0, 1)")
        return self

    @property
    def rank_search(self) -> int:
        return self.r_search or max(1, self.r_shared // 2)

    @property
    def rank_rec(self) -> int:
        return self.r_rec or max(1, self.r_shared // 2)


class TrainConfig(Section):
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="GPU actors (production) or CPU workers (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs reserved per worker.")
    torch_threads: int | None = Field(None, ge=1, le=1024, description="Intra-op threads per CPU "
                                      "worker (None = cpus_per_worker). A sweep that runs one trial at "
                                      "a time keeps tune.data_cpus free for the worker's table reads "
                                      "at start-up; after them that CPU idles unless the worker uses it.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement of the worker group on the cluster (Ray placement group): "
        "STRICT_SPREAD puts every worker on its own node, so losing one node costs one worker.")
    worker_resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray "
                                               "resources each worker needs besides CPU/GPU, e.g. "
                                               "{trainer_slot: 1} to keep workers on the nodes that "
                                               "advertise it.")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto probes bf16 "
                                                       "autocast speed at start-up and records it.")
    compile: bool = Field(False, description="torch.compile each decoder layer (dynamic shapes): "
                          "fuses the norms, rotary and activation ops "
                          "around the matmuls; ~40 s of compilation at the first step. A CPU bench "
                          "step went from 1.61 to 1.36 s; in the Amazon job the gain was within the "
                          "machine's drift (docs/learning.md round 6), so it is off by default.")
    lr: float = Field(1e-4, gt=0, le=1, description="Peak learning rate.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before cosine decay.")
    max_steps: int = Field(100, ge=1, le=10_000_000, description="Optimizer steps per run.")
    batch_size: int = Field(8, ge=2, le=65_536, description="Examples per optimizer step (both "
                            "tasks together, per worker, before accumulation).")
    search_fraction: float = Field(0.5, gt=0, lt=1, description="Share of each batch drawn from "
                                   "search examples; the rest are rec.")
    grad_accum: int = Field(1, ge=1, le=1024, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping (None = off).")
    max_seq_len: int = Field(256, ge=16, le=131_072, description="Prompts are left-truncated to "
                             "this many tokens.")
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    report_every: int = Field(10, ge=1, description="Steps between metric reports.")
    speed_probes: bool = Field(True, description="Each report also times a fixed matmul "
                               "(machine/*) and a no-grad forward of one fixed batch "
                               "(train/probe_forward_s), ~0.7-1.2 s per report, so that step-time "
                               "changes can be read against the machine's speed; off for short "
                               "runs (the demo's 20-step trials), where it is ~6 % of the time.")
    eval_every: int | None = Field(None, ge=1, description="Steps between val evaluations "
                                   "(None = only at the end).")
    max_failures: int = Field(2, ge=0, le=100, description="Worker failures tolerated (resume "
                              "from the last checkpoint).")
    fail_at_step: int | None = Field(None, ge=1, description="Fault injection for tests: rank 0 "
                                     "dies once at this step.")
    seed: int = Field(0, ge=0, description="Training seed.")
    storage_path: str = Field("ray_results", description="Checkpoints (relative to state_dir, or "
                              "s3://, or an NFS path on clusters).")
    checkpoints_to_keep: int | None = Field(2, ge=1, le=10_000, description="Newest checkpoints "
                                            "kept in storage per run (None = all); each holds "
                                            "weights and optimizer state.")
    loss: Literal["catalog", "vocab"] = Field(
        "catalog", description="Softmax at the target position: over the catalog's item tokens "
        "(what evaluation ranks; learns items from step 0 and leaves text tokens alone) or over the "
        "whole vocabulary (must first move next-token mass from text onto items).")
    item_lr_scale: float = Field(1.0, gt=0, le=1000, description="Item-token rows learn at "
                                 "item_lr_scale x the scheduled lr (every method; gems.item_rows).")
    item_weight_decay: float = Field(0.0, ge=0, le=1000, description="Decoupled weight decay on the "
                                     "item-token rows only: each step pulls them by lr x "
                                     "item_lr_scale x this toward item_decay_to.")
    item_decay_to: Literal["zero", "init"] = Field(
        "zero", description="Where item_weight_decay pulls item rows: zero (plain decay) or their "
        "values when training started (L2-SP: keeps what title/neighbour initialisation knew about "
        "items that are rarely or never a target).")
    history_targets: float = Field(0.0, ge=0, le=100, description="Weight of the history item "
                                   "tokens as targets, each predicted from the items before it "
                                   "(shared by an example's history; its answer weighs 1). 0 = off: "
                                   "only the answer is a target. More item transitions per step "
                                   "at no extra forward pass (gems.target_loss).")
    history_target_tasks: list[Literal["search", "rec"]] = Field(
        default_factory=lambda: ["search", "rec"], description="Tasks whose examples get history "
        "targets. Each task's loss is averaged over its own target weight and the tasks keep their "
        "example shares, so history targets in rec leave search's share of the step as it was.")
    token_weighting: Literal["none", "talr", "flow"] = Field(
        "none", description="Loss reweighting against forgetting (gems.token_weighting), every "
        "method: talr weighs each target by p^(1/tau) under the current model (no extra pass); flow "
        "weighs each example by exp(-l0/tau) from its loss before training (one no-grad pass over "
        "the examples the run will see, before step 1).")
    weighting_tau: float | None = Field(None, gt=0, le=1e6, description="tau of token_weighting; "
                                        "None = dynamic: talr the median over a micro-batch's "
                                        "sequences of their mean target NLL, flow each task's median "
                                        "base loss.")
    weighting_norm: Literal["self_norm", "mean"] = Field(
        "self_norm", description="talr: self_norm = sum(w l) / sum(w) within each micro-batch; mean "
        "= the plain mean's normaliser with each weight floored at 0.01.")
    length_bucket_steps: int = Field(16, ge=1, le=100_000, description="Each task's examples for "
                                     "this many consecutive steps are drawn together and grouped "
                                     "by prompt length (less padding); 1 = no bucketing.")

    @field_validator("worker_resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not name or name in ("CPU", "GPU", "memory"):
                raise ValueError(f"train.worker_resources: {name!r} is not a custom resource "
                                 "(CPU and GPU come from cpus_per_worker and use_gpu)")
            if not 0 < amount < float("inf"):
                raise ValueError(f"train.worker_resources.{name} must be a number > 0, got {amount}")
        return value


class EvalConfig(Section):
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1,
                          description="K for Hit@K (NDCG uses those >= 5).")
    num_negatives: int = Field(99, ge=1, le=100_000, description="Sampled negatives per target "
                               "in the sampled protocol.")
    mask_history_rec: bool = Field(True, description="Exclude items already in the history from "
                                   "rec rankings.")
    max_examples: int | None = Field(None, ge=1, description="Cap on evaluated examples per task "
                                     "and split (seeded subset).")
    batch_size: int = Field(16, ge=1, le=4096, description="Prompts per scoring forward pass.")
    retention: bool = Field(True, description="Measure general-domain retention vs the base model.")
    retention_max_tokens: int = Field(4096, ge=64, description="Tokens of held-out general text "
                                      "for perplexity and KL.")
    mmlu_questions: int = Field(100, ge=0, description="Seeded MMLU-Redux subset size (0 = skip).")
    bm25_fusion: bool = Field(False, description="Search rankings fused with BM25 of the query, "
                              "(1 - w) z(model) + w z(BM25) per example (gems.lexical_fusion): "
                              "ranks targets that were never a training answer. The job reports "
                              "the fused val search NDCG@10 (the sweep's objective) and test "
                              "metrics, and registers a ranker that serves the fused ranking; the "
                              "comparison adds a '<method>+bm25' row per LLM run.")
    bm25_weight: float | None = Field(None, ge=0, le=1, description="w of bm25_fusion; None = the "
                                      "weight among 0, 0.05, ..., 1 with the best val search "
                                      "NDCG@10 (the smallest on ties).")
    val_precision: Literal["train", "fp32"] = Field(
        "train", description="Val scoring during training: 'train' runs the body at the training's "
        "precision (bf16 autocast when training uses it) with the head in fp32; 'fp32' throughout. "
        "Test evaluation is always fp32.")


class Config(Section):
    """The library's sections: what gems/ and serving/ read. A job's config (``tune/config.py``)
    extends it with the sections of the Ray Tune, MLflow and nightly layer."""

    name: str = Field("gems-sr", min_length=1, description="Run name prefix.")
    state_dir: str = Field(".state", description="Absolute or project-relative root for data, "
                           "caches, MLflow DB and checkpoints.")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig
    items: ItemsConfig = Field(default_factory=ItemsConfig)
    gems: GEMSConfig = Field(default_factory=GEMSConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    sasrec: SASRecConfig = Field(default_factory=SASRecConfig, description="The SASRec "
                                 "collaborative floor (methods sasrec, sasrec-bm25).")
    dpmoe: DPMoEConfig = Field(default_factory=DPMoEConfig, description="DPMoE's experts, routers, "
                               "fusion and loss weights (gems.method=dpmoe).")

    @model_validator(mode="after")
    def _dpmoe_trains_what_it_can(self) -> Config:
        """DPMoE has its own loss (catalog CE + InfoNCE + balance over its fused state): options that
        change what an LM method's loss means are refused; those that tune the item rows or add history
        targets do not apply (its item rows stay frozen) and are left out, with a log line at start-up
        (gems.methods), so one config can compare DPMoE with the LM methods."""
        if self.gems.method == "dpmoe":
            t = self.train
            bad = [f"{name}={value}" for name, value, ok in (
                ("train.token_weighting", t.token_weighting, t.token_weighting == "none"),
                ("train.loss", t.loss, t.loss == "catalog")) if not ok]
            if bad:
                raise ValueError(f"gems.method=dpmoe cannot use {', '.join(bad)}: DPMoE trains its experts, "
                                 "routers and fusion on the catalog loss of its fused state")
        return self

    @property
    def state_path(self) -> Path:
        """Absolute state dir: never relative to Ray's unpacked working_dir."""
        p = Path(self.state_dir).expanduser()
        return p if p.is_absolute() else PROJECT_ROOT / p

    def resolve(self, relative: str) -> Path:
        """A path from the config: absolute as given, else under the state dir. ``..`` is resolved
        lexically, so ``../../data`` works before the state dir exists (a fresh checkout)."""
        p = Path(relative).expanduser()
        return p if p.is_absolute() else Path(os.path.normpath(self.state_path / p))


C = TypeVar("C", bound=Config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-typed value)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(f"bad override {text!r}: expected section.field=value, "
                          "e.g. --set gems.tau=0.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"bad override {text!r}: value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: {key} is not a section")
            node = child
        node[keys[-1]] = value
    return raw


def _describe(err: ValidationError, schema: type[Config]) -> str:
    where = " or ".join(f"{c.__module__.replace('.', '/')}.py"
                        for c in schema.__mro__ if issubclass(c, Config))
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<config>"
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown key (check spelling; see {where})")
        elif e["type"] == "missing":
            lines.append(f"{field}: required field is missing")
        elif not e["loc"]:  # a rule across sections: its message names the fields, not the whole config
            lines.append(f"{field}: {e['msg']}")
        else:
            lines.append(f"{field}: value {e.get('input')!r} is invalid: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate_config(schema: type[C], raw: dict[str, Any], overrides: list[str] | None = None) -> C:
    """``raw`` with ``--set`` overrides applied, validated in one pass as ``schema`` (Config or a
    job config extending it); ConfigError naming every offending field."""
    raw = apply_overrides(dict(raw), list(overrides or []))
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, schema)) from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML config file (a bare name looks in pipelines/configs/), unvalidated."""
    p = Path(path)
    if not p.exists() and (CONFIG_DIR / p).exists():
        p = CONFIG_DIR / p
    if not p.exists() and (CONFIG_DIR / f"{p}.yaml").exists():
        p = CONFIG_DIR / f"{p}.yaml"
    if not p.exists():
        raise ConfigError(f"config file not found: {path}")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    return raw
