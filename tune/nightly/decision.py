"""Champion vs challenger: promote only a challenger that is not worse beyond the tolerances.

Both models are scored on the same fresh holdout (the newest day), so the comparison is paired.
The rule is deliberately one-sided: a challenger does not have to win, it must not lose by more
than ``tolerance`` on the unified metric (mean search/rec NDCG@10) nor make general text more than
``retention_tolerance`` (relative) harder than the champion does, nor drift from the champion's
language by more than ``max_kl`` (mean KL(champion || challenger) per general-text token). The KL
gate is the one retention check a fresh machine always has: perplexity needs held-out human text
(wikitext-2), KL is also measured on text the champion writes itself. Yesterday's data is fresher
than the champion's, so a tie goes to the challenger.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelScores:
    """What the decision looks at for one model on the night's holdout."""

    unified: float
    perplexity: float | None = None  # general-text perplexity; None = not measured
    kl_from_champion: float | None = None  # KL(champion || this model), nats/token; None = not measured
    metrics: dict[str, float] = field(default_factory=dict)  # everything else, for the record


@dataclass(frozen=True)
class Decision:
    promote: bool
    reasons: tuple[str, ...]
    unified_delta: float  # challenger - champion
    perplexity_ratio: float | None  # challenger / champion

    @property
    def verdict(self) -> str:
        return "promoted" if self.promote else "rejected"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "verdict": self.verdict}


def decide(champion: ModelScores, challenger: ModelScores, tolerance: float,
           retention_tolerance: float, max_kl: float | None = None) -> Decision:
    """Promote iff the challenger's unified metric is finite and >= champion - tolerance, its
    perplexity (when both were measured) is <= champion x (1 + retention_tolerance), and its KL from
    the champion (when measured and ``max_kl`` is set) is <= max_kl."""
    if tolerance < 0 or retention_tolerance < 0:
        raise ValueError(f"tolerances must be >= 0, got {tolerance}, {retention_tolerance}")
    if max_kl is not None and max_kl < 0:
        raise ValueError(f"max_kl must be >= 0 or None, got {max_kl}")
    reasons: list[str] = []
    ok = True
    delta = challenger.unified - champion.unified
    if not math.isfinite(challenger.unified):
        ok = False
        reasons.append(f"challenger unified metric is {challenger.unified} (training diverged?)")
    elif not math.isfinite(champion.unified):
        reasons.append(f"champion unified metric is {champion.unified}; any finite challenger wins")
    elif delta < -tolerance:
        ok = False
        reasons.append(f"unified {challenger.unified:.4f} is {-delta:.4f} below the champion's "
                       f"{champion.unified:.4f} (tolerance {tolerance})")
    else:
        reasons.append(f"unified {challenger.unified:.4f} vs champion {champion.unified:.4f} "
                       f"(delta {delta:+.4f}, tolerance {tolerance})")

    ratio = None
    if champion.perplexity is None or challenger.perplexity is None:
        reasons.append("retention not compared: perplexity was not measured for both models")
    elif not math.isfinite(challenger.perplexity):
        ok = False
        reasons.append(f"challenger perplexity is {challenger.perplexity}")
    else:
        ratio = challenger.perplexity / champion.perplexity
        if ratio - 1 > retention_tolerance:
            ok = False
            reasons.append(f"general-text perplexity {challenger.perplexity:.3f} is {100 * (ratio - 1):.1f}% "
                           f"above the champion's {champion.perplexity:.3f} (tolerance "
                           f"{100 * retention_tolerance:.1f}%)")
        else:
            reasons.append(f"perplexity ratio {ratio:.4f} within 1 + {retention_tolerance}")

    kl = challenger.kl_from_champion
    if max_kl is not None and kl is None:
        reasons.append("language drift not compared: KL from the champion was not measured")
    elif max_kl is not None and (not math.isfinite(kl) or kl > max_kl):
        ok = False
        reasons.append(f"general-text KL from the champion {kl:.4f} nats/token exceeds {max_kl}")
    elif max_kl is not None:
        reasons.append(f"general-text KL from the champion {kl:.4f} nats/token within {max_kl}")
    return Decision(promote=ok, reasons=tuple(reasons), unified_delta=delta, perplexity_ratio=ratio)
