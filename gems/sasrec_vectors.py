"""Collaborative item vectors from a trained SASRec, mapped into the LLM's embedding space.

DESIGN.md section 4: item rows may start from collaborative embeddings (as E4SRec and LLaRA do)
besides the title mean. SASRec's vectors live in their own space (width 64, their own scale), so
``project_to_width`` fits one linear map from them to the LLM's title-mean
item rows: the projected rows then sit in the backbone's embedding scale and distribution. The
default map is a scaled rotation (``fit_orthogonal_map``), which keeps which items go together
exactly; the ridge fit keeps only what the vectors say about the titles.
Rows are ordered like the catalog list they came with (the harness's list is sorted by item id).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gems.sasrec import SASRec

_ITEM_IDS_KEY = "item_ids"


def sasrec_item_vectors(model: SASRec, item_ids: Sequence[str] | None = None) -> torch.Tensor:
    """The tied input/output item embeddings [n_items, hidden] (float32, detached), in the order
    of ``item_ids`` (default: the model's catalog order); an id the model does not know fails."""
    table = model.item_emb.weight.detach()[1:].float().clone()
    if item_ids is None:
        return table
    index = {item: i for i, item in enumerate(model.item_ids)}
    missing = [str(i) for i in item_ids if str(i) not in index]
    if missing:
        raise ValueError(f"{len(missing)} items are not in the SASRec catalog (first: {missing[:5]})")
    return table[torch.tensor([index[str(i)] for i in item_ids], dtype=torch.long)]


def fit_projection(vectors: torch.Tensor, target: torch.Tensor,
                   ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [h, d], b [d]) minimising ||vectors W + b - target||^2 + lam * ||W||^2.

    Solved in float64 on centred data (the bias is not penalised). lam = ridge x the mean
    diagonal of Xc^T Xc (= ridge x n x the mean variance of a vector coordinate), so ``ridge``
    does not depend on the vectors' scale or count; 0 = ordinary least squares.
    """
    if vectors.dim() != 2 or target.dim() != 2 or vectors.shape[0] != target.shape[0]:
        raise ValueError(f"need vectors [n, h] and target [n, d] with the same n, got "
                         f"{tuple(vectors.shape)} and {tuple(target.shape)}")
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    x, y = vectors.double(), target.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    gram = xc.T @ xc
    penalty = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    weight = torch.linalg.solve(gram + penalty * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ yc)
    return weight, y_mean - x_mean @ weight


def fit_orthogonal_map(vectors: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [h, d], b [d]): the rotation of the centred vectors closest to the centred target
    (orthogonal Procrustes), times one scale that gives them the target's mean row norm; b is the
    target's mean.

    Unlike the ridge fit, which keeps only what the vectors say about the target (the title rows),
    this keeps the vectors' own geometry: every dot product between two centred items changes by
    the same factor, so an item's collaborative neighbours stay its neighbours in the LLM's rows
    (Amazon Office, nearest-row ranking from the last history item, 500 val rows: 0.035 NDCG@10
    after the ridge map, 0.057 after this one, 0.051 in SASRec's own space;
    tests/benchmarks/probe_item_rows.py)."""
    if vectors.dim() != 2 or target.dim() != 2 or vectors.shape[0] != target.shape[0]:
        raise ValueError(f"need vectors [n, h] and target [n, d] with the same n, got "
                         f"{tuple(vectors.shape)} and {tuple(target.shape)}")
    x, y = vectors.double(), target.double()
    x_mean, y_mean = x.mean(dim=0), y.mean(dim=0)
    xc, yc = x - x_mean, y - y_mean
    u, _, vh = torch.linalg.svd(xc.T @ yc, full_matrices=False)
    scale = float(yc.norm(dim=1).mean()) / max(float(xc.norm(dim=1).mean()), 1e-12)
    weight = scale * (u @ vh)
    return weight, y_mean - x_mean @ weight


COLLAB_MAPS: tuple[str, ...] = ("orthogonal", "ridge")


def project_to_width(vectors: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3,
                     mapping: str = "orthogonal") -> torch.Tensor:
    """``vectors`` [n, h] mapped onto ``target`` [n, d] (same item order) by ``mapping``
    (``orthogonal``: :func:`fit_orthogonal_map`; ``ridge``: :func:`fit_projection`), in
    ``target``'s dtype: rows for the LLM's item tokens with the backbone's scale."""
    if mapping == "orthogonal":
        weight, bias = fit_orthogonal_map(vectors, target)
    elif mapping == "ridge":
        weight, bias = fit_projection(vectors, target, ridge)
    else:
        raise ValueError(f"items.collab_map must be one of {COLLAB_MAPS}, got {mapping!r}")
    return (vectors.double() @ weight + bias).to(target.dtype)


def save_item_vectors(path: str | Path, vectors: torch.Tensor, item_ids: Sequence[str]) -> Path:
    """One safetensors file: the vectors, with the item id list in its metadata."""
    if vectors.dim() != 2 or vectors.shape[0] != len(item_ids):
        raise ValueError(f"{len(item_ids)} item ids for vectors of shape {tuple(vectors.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vectors.detach().contiguous().cpu()}, str(path),
              metadata={_ITEM_IDS_KEY: json.dumps([str(i) for i in item_ids])})
    return path


def load_item_vectors(path: str | Path) -> tuple[torch.Tensor, list[str]]:
    """(vectors [n, d], item ids) as saved by ``save_item_vectors``."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if _ITEM_IDS_KEY not in metadata:
        raise ValueError(f"{path} has no item id list; write it with save_item_vectors")
    return load_file(str(path))["vectors"], json.loads(metadata[_ITEM_IDS_KEY])
