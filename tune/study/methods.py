"""Which methods a comparison runs: parsing ``--methods`` (with ablation variants) into specs.

A method is one of the four LLM training methods (gems, adamw, lora, galore), a non-LLM floor
(popularity, itemknn, bm25), the SASRec collaborative floor (sasrec, and sasrec-bm25 whose search rankings
fuse BM25's query match in; settings: ``--set sasrec.*``), a named GEMS ablation
(``gems-nonull``, ...), or any LLM method with inline overrides in brackets:
``gems[k=0,fixed_gate=0.5]``, ``lora[lora_r=8]``, ``gems[train.lr=3e-4]``. A ``+talr`` or ``+flow``
after the name trains that method with the loss reweighting (``train.token_weighting``):
``gems+talr``, ``adamw+flow``, ``gems-nonull+talr[k=8]``.
A bare key inside brackets is a ``gems.*`` field. The budget (steps, batch, sequence length,
accumulation, seed) may only be changed for all methods at once (``--set``), never per method:
a comparison where one method trains longer than another proves nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gems.config import ConfigError, apply_overrides
from gems.sasrec_floor import SASREC_METHODS
from tune.config import JobConfig, config_from_dict

LLM_METHODS: tuple[str, ...] = ("gems", "adamw", "lora", "galore", "dpmoe")
FLOORS: tuple[str, ...] = ("popularity", "itemknn", "bm25")
#: Trained on the driver once per study seed (gems.sasrec_floor), no LLM involved.
SASREC: tuple[str, ...] = SASREC_METHODS

#: Named GEMS ablations (DESIGN.md section 5 switches); each is gems + these overrides.
VARIANTS: dict[str, tuple[str, ...]] = {
    "gems-shared": ("gems.task_subspaces=false",),      # single shared subspace, no task subspaces
    "gems-nonull": ("gems.k=0",),                       # no null-space projection
    "gems-fixedgate": ("gems.fixed_gate=0.5",),         # equal fixed gate instead of the adaptive one
    "gems-nocomp": ("gems.complementary=false",),       # task bases not orthogonal to the shared one
    "gems-rotate": ("gems.moment_transfer=rotate",),
    "gems-keep": ("gems.moment_transfer=keep",),
    "gems-reset": ("gems.moment_transfer=reset",),
    "gems-input": ("gems.nullspace_side=input",),
    "gems-output": ("gems.nullspace_side=output",),
}

#: ``<method>+<suffix>``: the method with ``train.token_weighting`` (gems.token_weighting).
WEIGHTING_SUFFIXES: dict[str, str] = {"talr": "train.token_weighting=talr",
                                      "flow": "train.token_weighting=flow"}

#: Fields that define the shared budget and split; per-method overrides of them are refused.
BUDGET_FIELDS: frozenset[str] = frozenset({
    "train.max_steps", "train.batch_size", "train.max_seq_len", "train.grad_accum", "train.seed",
    "train.search_fraction", "train.num_workers", "data", "eval", "model",
})


@dataclass(frozen=True)
class MethodSpec:
    """One column of the comparison: a label (as written on the command line) and how to run it."""

    label: str
    kind: Literal["llm", "floor", "sasrec"]
    method: str  # gems|adamw|lora|galore for llm; popularity|bm25 for floors; sasrec|sasrec-bm25
    overrides: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_llm(self) -> bool:
        return self.kind == "llm"

    def config(self, base: JobConfig, seed: int) -> JobConfig:
        """``base`` with this method, its overrides and the run's training seed applied."""
        raw = base.model_dump(mode="json")
        return config_from_dict(apply_overrides(raw, [f"gems.method={self.method}", *self.overrides,
                                                      f"train.seed={seed}"]))


def split_method_list(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``gems,gems[k=0,tau=2],lora``."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"--methods {text!r}: unbalanced ']'")
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth != 0:
        raise ConfigError(f"--methods {text!r}: unbalanced '['")
    parts.append("".join(current).strip())
    if any(not p for p in parts):
        raise ConfigError(f"--methods {text!r}: empty method name (stray comma?)")
    return parts


def _qualified(key_value: str, label: str) -> str:
    key, sep, value = key_value.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"method {label!r}: override {key_value!r} is not field=value")
    full = key if "." in key else f"gems.{key}"
    if full in BUDGET_FIELDS or full.split(".")[0] in BUDGET_FIELDS or full == "gems.method":
        raise ConfigError(f"method {label!r}: {full} is part of the shared budget/split; change it "
                          "for all methods with --set, not per method")
    return f"{full}={value.strip()}"


def parse_method(label: str) -> MethodSpec:
    """One ``--methods`` entry -> MethodSpec (clear error naming what is wrong)."""
    name, _, rest = label.partition("[")
    name, *suffixes = [part.strip() for part in name.split("+")]
    unknown = [x for x in suffixes if x not in WEIGHTING_SUFFIXES]
    if unknown or len(suffixes) > 1:
        raise ConfigError(f"method {label!r}: '+' takes one loss reweighting, one of "
                          f"{sorted(WEIGHTING_SUFFIXES)} (got {suffixes})")
    overrides: tuple[str, ...] = tuple(WEIGHTING_SUFFIXES[x] for x in suffixes)
    if rest:
        if not rest.endswith("]"):
            raise ConfigError(f"method {label!r}: expected name[field=value,...]")
        inner = rest[:-1]
        overrides += tuple(_qualified(kv, label) for kv in split_method_list(inner))
    if name in FLOORS:
        if overrides:
            raise ConfigError(f"method {label!r}: floors take no overrides")
        return MethodSpec(label, "floor", name)
    if name in SASREC:
        if overrides:
            raise ConfigError(f"method {label!r}: {name} takes no inline overrides; set sasrec.* "
                              "with --set")
        return MethodSpec(label, "sasrec", name)
    if name in VARIANTS:
        return MethodSpec(label, "llm", "gems", VARIANTS[name] + overrides)
    if name in LLM_METHODS:
        return MethodSpec(label, "llm", name, overrides)
    known = ", ".join([*LLM_METHODS, *FLOORS, *SASREC, *VARIANTS])
    raise ConfigError(f"unknown method {name!r} in {label!r}; known: {known}")


def parse_methods(text: str | Sequence[str]) -> list[MethodSpec]:
    """``--methods`` (one string, or several) -> specs, labels unique."""
    entries = split_method_list(text) if isinstance(text, str) else [
        e for t in text for e in split_method_list(t)]
    specs = [parse_method(e) for e in entries]
    labels = [s.label for s in specs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ConfigError(f"--methods lists {dupes} more than once")
    return specs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: expected comma-separated integers, e.g. 0,1") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: need distinct non-negative integers")
    return seeds


def fused_label(label: str) -> str:
    """The row of an LLM run's search fused with BM25 (``eval.bm25_fusion``): ``gems`` -> ``gems+bm25``."""
    return f"{label}+bm25"
