"""Settings of DPMoE (``gems.method: dpmoe``; L2Rec's dual-view personalised MoE-LoRA, gems.dpmoe).

Kept apart from ``gems/config.py`` like the SASRec floor's section and hooked into the root
``Config`` as ``dpmoe``. Defaults: the issue's rank 8 and top-2 routing, one shared expert and three
per view (top-2 of 3 keeps routing a choice), InfoNCE at temperature 0.1.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DPMoEConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    n_shared: int = Field(1, ge=0, le=64, description="Shared LoRA experts, always on in both views.")
    n_sem: int = Field(3, ge=1, le=64, description="Semantic-view experts (routed per example).")
    n_beh: int = Field(3, ge=1, le=64, description="Behavioural-view experts (routed per example).")
    rank: int = Field(8, ge=1, le=4096, description="Rank of every expert.")
    alpha: float = Field(16.0, gt=0, le=1e4, description="LoRA scale: each expert adds alpha/rank x B A x.")
    top_k: int = Field(2, ge=1, le=64, description="Experts each view's router chooses per example "
                       "(weights renormalised over them).")
    lambda_bpc: float = Field(0.1, ge=0, le=100, description="Weight of the symmetric in-batch "
                              "InfoNCE between the behavioural and semantic states.")
    lambda_bal: float = Field(0.01, ge=0, le=100, description="Weight of the routers' load-balancing "
                              "loss.")
    temperature: float = Field(0.1, gt=0, le=100, description="InfoNCE temperature.")
    title_words: int = Field(8, ge=1, le=64, description="Title words per history item in the "
                             "semantic view (titles come from the catalog, whatever the prompt shows).")
    fusion: Literal["acf", "mean", "concat"] = Field("acf", description="Cross-view fusion: acf = "
                                                     "a sigmoid gate per dimension over [z_b; z_s; "
                                                     "z_b * z_s], mean, or a linear map of [z_b; z_s].")

    @model_validator(mode="after")
    def _top_k_fits(self) -> DPMoEConfig:
        if self.top_k > min(self.n_sem, self.n_beh):
            raise ValueError(f"dpmoe.top_k ({self.top_k}) must be at most min(n_sem, n_beh) = "
                             f"{min(self.n_sem, self.n_beh)}")
        return self

    @property
    def n_experts(self) -> int:
        return self.n_shared + self.n_sem + self.n_beh
