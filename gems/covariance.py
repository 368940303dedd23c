"""Covariance estimation: ``U_k`` per target weight from its activations on general text, cached.

``C = (1/N) sum x x^T`` of each target layer's inputs (or outputs) over the general-text windows,
then its top-k eigenvectors (or the fewest holding ``gems.energy`` of the trace). Estimating costs
forward passes over the whole corpus, so the bases are cached as safetensors keyed by everything
they depend on (:func:`build_bases`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from gems.config import GEMSConfig
from gems.general_text import SEQ_LEN, token_windows
from gems.subspace import target_parameter_names

log = logging.getLogger(__name__)

#: Which activations a basis spans: a target layer's inputs, or its outputs.
NullSide = Literal["input", "output"]
COVARIANCE_BUDGET_BYTES = 512 * 2**20  # covariances accumulated per pass over the corpus


class Bases(dict[str, Tensor]):
    """``param_name -> U_k`` plus ``info`` (corpus, side, k, cache file): what the run records."""

    info: dict[str, str]

    def __init__(self, data: Mapping[str, Tensor] | None = None,
                 info: Mapping[str, str] | None = None) -> None:
        super().__init__(data or {})
        self.info = dict(info or {})

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.info.items()))


def _sha(parts: Iterable[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def model_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """Hash of the target weights (shapes, sums and a strided sample): keys the basis cache.

    Only target weights enter, so adding item tokens (which resizes embeddings) keeps the key,
    while a fine-tuned model (different weights) never reuses the pretrained model's bases.
    """
    params = dict(model.named_parameters())

    def parts() -> Iterable[bytes]:
        for name in sorted(names):
            w = params[name].detach().float().reshape(-1).cpu()
            step = max(1, w.numel() // 256)
            yield name.encode() + str(tuple(params[name].shape)).encode()
            yield struct.pack("<d", float(w.double().sum())) + w[::step][:256].numpy().tobytes()
    return _sha(parts())


class _CovarianceHooks:
    """Forward hooks that accumulate ``sum x x^T`` of chosen modules' inputs or outputs."""

    def __init__(self, modules: Mapping[str, nn.Module], side: NullSide) -> None:
        self.side = side
        self.sums: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0] if self.side == "input" else output
            x = x.detach().reshape(-1, x.shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.count[name] = 0
            self.sums[name].addmm_(x.T, x)
            self.count[name] += x.shape[0]
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def _shared_inputs(model: nn.Module, modules: Mapping[str, nn.Module], window: Tensor) -> dict[str, str]:
    """module -> representative module that receives the very same input tensor (q/k/v, gate/up).

    One short probe forward; only modules of the same block are compared (a freed activation's
    memory can be reused by a later block), and the tensors are held while comparing.
    """
    seen: dict[str, list[tuple[Tensor, str]]] = {}
    alias: dict[str, str] = {}

    def block(name: str) -> str:
        parts = name.split(".")
        digits = [i for i, p in enumerate(parts) if p.isdigit()]
        return ".".join(parts[: digits[-1] + 1]) if digits else ""

    def make(name: str):  # noqa: ANN202 - a torch hook
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            group = seen.setdefault(block(name), [])
            for other, rep in group:
                if other is x:
                    alias[name] = rep
                    return
            group.append((x, name))
            alias[name] = name
        return hook

    handles = [m.register_forward_hook(make(name)) for name, m in modules.items()]
    try:
        model(input_ids=window[:8].unsqueeze(0).to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return alias


def _passes(reps: Sequence[str], dims: Mapping[str, int], budget: int) -> list[list[str]]:
    """Group representatives so that each pass's float32 covariances fit in ``budget`` bytes."""
    out: list[list[str]] = [[]]
    used = 0
    for name in reps:
        size = dims[name] ** 2 * 4
        if out[-1] and used + size > budget:
            out.append([])
            used = 0
        out[-1].append(name)
        used += size
    return out


def _top_k(cov: Tensor, k: int, energy: float | None, name: str, side: NullSide) -> tuple[Tensor, float]:
    """Top-k eigenvectors (or the fewest holding ``energy`` of the trace) and the share they hold."""
    if energy is None and k > cov.shape[0]:
        raise ValueError(f"gems.k={k} exceeds the {side} dimension {cov.shape[0]} of {name}")
    evals, evecs = torch.linalg.eigh(cov)
    evals, evecs = evals.flip(0).clamp(min=0), evecs.flip(1)
    total = float(evals.sum())
    if energy is not None:
        cum = torch.cumsum(evals.double(), 0) / max(total, 1e-300)
        k = int((cum < energy).sum()) + 1
    captured = float(evals[:k].sum()) / total if total > 0 else 0.0
    return evecs[:, :k].float().contiguous(), captured


@torch.no_grad()
def activation_covariances(model: nn.Module, windows: Sequence[Tensor], names: Sequence[str],
                           side: NullSide = "input", budget_bytes: int = COVARIANCE_BUDGET_BYTES,
                           batch_size: int = 4) -> dict[str, Tensor]:
    """``C = (1/N) sum x x^T`` (float32) per target weight over the windows, all at once (analysis)."""
    covs: dict[str, Tensor] = {}
    for group in covariance_groups(model, windows, names, side, budget_bytes, batch_size):
        covs.update(group)
    return covs


def covariance_groups(model: nn.Module, windows: Sequence[Tensor], names: Sequence[str],
                      side: NullSide = "input", budget_bytes: int = COVARIANCE_BUDGET_BYTES,
                      batch_size: int = 4) -> Iterator[dict[str, Tensor]]:
    """Covariances per target weight, yielded one memory-bounded group of layers at a time.

    Modules that share one input tensor share one covariance; when all covariances do not fit in
    ``budget_bytes`` the corpus is run once per group. Accumulation is float32 (on the model's
    device): float64 triples the CPU time and the top eigenvectors do not need it.
    """
    modules = {n.removesuffix(".weight"): None for n in names}
    by_name = dict(model.named_modules())
    modules = {n: by_name[n] for n in modules}
    alias = (_shared_inputs(model, modules, windows[0]) if side == "input"
             else {n: n for n in modules})
    reps = list(dict.fromkeys(alias.values()))
    dims = {n: (modules[n].in_features if side == "input" else modules[n].out_features) for n in reps}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    members = {rep: [n for n in modules if alias[n] == rep] for rep in reps}
    try:
        for group in _passes(reps, dims, budget_bytes):
            hooks = _CovarianceHooks({n: modules[n] for n in group}, side)
            try:
                for start in range(0, len(windows), batch_size):
                    chunk = windows[start:start + batch_size]
                    for same in _equal_length(chunk):
                        model(input_ids=same.to(device), use_cache=False)
            finally:
                hooks.close()
            covs = {n: hooks.sums.pop(n) / hooks.count[n] for n in group}
            yield {f"{m}.weight": covs[n] for n in group for m in members[n]}
    finally:
        model.train(was_training)


def _equal_length(windows: Sequence[Tensor]) -> list[Tensor]:
    """Stack windows of equal length (only the corpus tail is shorter): no padding needed."""
    by_len: dict[int, list[Tensor]] = {}
    for w in windows:
        by_len.setdefault(len(w), []).append(w)
    return [torch.stack(ws) for ws in by_len.values()]


def save_bases(bases: Bases, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().clone() for k, v in bases.items()}, str(tmp), metadata=bases.info)
    tmp.replace(path)


def load_bases(path: Path) -> Bases:
    with safe_open(str(path), framework="pt") as f:
        return Bases({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})  # noqa: SIM118


def build_bases(model: nn.Module, texts: Iterable[str], tokenizer: PreTrainedTokenizerBase,
                gems_cfg: GEMSConfig, cache_dir: Path | None = None, corpus_source: str = "texts",
                seq_len: int = SEQ_LEN) -> Bases:
    """``U_k`` per target weight of the (pretrained) ``model`` from its activations on ``texts``.

    Cached as safetensors under ``cache_dir``, keyed by the target weights' fingerprint, the
    corpus tokens, k / energy, side, targets and window length. ``gems.k=0`` (no energy) -> empty.
    """
    if gems_cfg.k == 0 and gems_cfg.energy is None:
        return Bases({}, {"nullspace": "off (gems.k=0)"})
    names = target_parameter_names(model, gems_cfg.target_modules)
    if not names:
        raise ValueError(f"gems.target_modules={gems_cfg.target_modules} matches no weight of the model")
    windows = token_windows(texts, tokenizer, gems_cfg.general_max_tokens, seq_len)
    corpus_hash = _sha(w.numpy().astype("<i8").tobytes() for w in windows)
    key_fields = {"model": model_fingerprint(model, names), "corpus": corpus_hash, "k": gems_cfg.k,
                  "energy": gems_cfg.energy, "side": gems_cfg.nullspace_side, "targets": sorted(names),
                  "seq_len": seq_len}
    key = _sha([json.dumps(key_fields, sort_keys=True).encode()])[:20]
    path = cache_dir / f"nullspace-{key}.safetensors" if cache_dir is not None else None
    if path is not None and path.is_file():
        bases = load_bases(path)
        log.info("null-space bases from cache %s (%s)", path, bases.describe())
        return bases
    found: dict[str, Tensor] = {}
    shares = []
    for group in covariance_groups(model, windows, names, gems_cfg.nullspace_side):
        done: dict[int, Tensor] = {}  # modules sharing one covariance share its eigenvectors
        for name, cov in group.items():
            if id(cov) not in done:
                done[id(cov)], share = _top_k(cov, gems_cfg.k, gems_cfg.energy, name, gems_cfg.nullspace_side)
                shares.append(share)
            found[name] = done[id(cov)]
    bases = Bases({name: found[name] for name in names})
    ks = [u.shape[1] for u in bases.values()]
    bases.info = {"corpus": corpus_source, "corpus_sha256": corpus_hash,
                  "tokens": str(sum(len(w) for w in windows)), "side": gems_cfg.nullspace_side,
                  "k": str(gems_cfg.k) if gems_cfg.energy is None else f"energy={gems_cfg.energy}",
                  "k_range": f"{min(ks)}-{max(ks)}",
                  "energy_captured_mean": f"{sum(shares) / len(shares):.4f}",
                  "cache": str(path) if path is not None else "none"}
    if path is not None:
        save_bases(bases, path)
    return bases
