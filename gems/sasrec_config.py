"""Settings of the SASRec collaborative floor (``method: sasrec`` / ``sasrec-bm25`` in the study).

Kept apart from ``gems/config.py`` (which holds the LLM run's sections) and hooked into the root
``Config`` as ``sasrec``. Defaults follow Kang & McAuley (2018) for sparse Amazon data: width 64,
2 blocks, 1 head, dropout 0.5, Adam(W) at 1e-3, batch 128. On Amazon Office's val split (amazon.yaml)
dropout 0.5 beat 0.2 on both seeds tried (val NDCG@10 0.0519 / 0.0503 vs 0.0500 / 0.0475); 2 heads,
lr 3e-3, weight decay 0.1 and a shared start token were not better.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class SASRecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    hidden: int = Field(64, ge=4, le=4096, description="Width of item/position embeddings and of "
                        "the Transformer blocks (the point-wise FFN keeps this width, as in SASRec).")
    blocks: int = Field(2, ge=1, le=24, description="Causal self-attention blocks.")
    heads: int = Field(1, ge=1, le=64, description="Attention heads per block (must divide hidden).")
    dropout: float = Field(0.5, ge=0, lt=1, description="Dropout on embeddings, attention and FFN.")
    max_len: int = Field(50, ge=1, le=4096, description="Most recent history items fed to the "
                         "model (older ones are cut); the shards' histories hold at most "
                         "data.history_len items anyway.")
    task_token: bool = Field(True, description="Start every sequence with a learned per-task token "
                             "([search] or [rec]), so the model can tell the tasks' target "
                             "distributions apart and score an empty history; False = one shared "
                             "start token (plain SASRec).")
    lr: float = Field(1e-3, gt=0, le=1, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, le=1, description="AdamW decoupled weight decay.")
    batch_size: int = Field(128, ge=1, le=65_536, description="Training examples per step.")
    max_epochs: int = Field(200, ge=1, le=100_000, description="Upper bound on training epochs.")
    patience: int = Field(10, ge=1, le=10_000, description="Stop after this many epochs without a "
                          "better val NDCG@10 (mean of search and rec); the best epoch's weights "
                          "are restored.")
    seed: int = Field(0, ge=0, description="Seed of initialisation, shuffling and dropout for "
                      "standalone fits; the comparison uses each study seed instead (as it does "
                      "for train.seed).")
    threads: int | None = Field(1, ge=1, le=1024, description="torch intra-op threads while "
                                "SASRec trains and scores (restored afterwards); None = leave the "
                                "process setting. Its ops are tiny: on the shared 2-core machine 3 "
                                "Amazon Office epochs took 4.6-6.1 s on 1 thread and 149-361 s on 2 "
                                "(threads waiting on each other while the other core was busy).")
    search_fusion_weight: float | None = Field(
        None, ge=0, le=1, description="sasrec-bm25: search score = (1 - w) * z(SASRec) + w * "
        "z(BM25), z-scored per example over the catalog; None = the w in fusion_grid with the "
        "best val search NDCG@10.")
    fusion_grid: list[float] = Field(
        default_factory=lambda: [round(0.05 * i, 2) for i in range(21)], min_length=1,
        description="Fusion weights tried on val when search_fusion_weight is None.")

    @model_validator(mode="after")
    def _heads_divide(self) -> SASRecConfig:
        if self.hidden % self.heads:
            raise ValueError(f"sasrec.hidden {self.hidden} must be divisible by sasrec.heads "
                             f"{self.heads}")
        bad = [w for w in self.fusion_grid if not 0 <= w <= 1]
        if bad:
            raise ValueError(f"sasrec.fusion_grid: weights must lie in [0, 1], got {bad}")
        return self
