"""Null-space projection: keep each target layer's general-domain behaviour exactly.

``U_k`` (per target weight) spans the top-k eigenvectors of the covariance of the layer's
activations on general-domain text, computed once from the *pretrained* model. Every gradient
and the final update are projected onto the orthogonal complement, ``P = I - U_k U_k^T`` (never
materialised): on the input side ``G <- G P`` so ``(W_t - W_0) U_k = 0`` and ``W_t x = W_0 x`` for
every x in span(U_k); on the output side ``G <- P G`` so ``U_k^T (W_t - W_0) = 0``.

This module holds the projection (:class:`NullSpace`) and what a run calls to get its bases: the
general corpus it resolves and :func:`bases_for_run`. The text is made in :mod:`gems.general_text`,
``U_k`` is estimated and cached in :mod:`gems.covariance`; their public names are importable from
here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from gems.config import GEMSConfig
from gems.covariance import (
    Bases,
    NullSide,
    activation_covariances,
    build_bases,
    load_bases,
    model_fingerprint,
    save_bases,
)
from gems.general_text import (
    GENERATION_PROMPTS,
    GeneralCorpus,
    generate_general_texts,
    read_paragraphs,
    token_windows,
)
from gems.paths import shared_file
from gems.subspace import Subspace, target_parameter_names

__all__ = [  # the public names of the null-space machinery, wherever they live
    "GENERATION_PROMPTS", "Bases", "GeneralCorpus", "NullSpace", "activation_covariances", "bases_for_run",
    "build_bases", "load_bases", "resolve_general_corpus", "save_bases", "token_windows",
]


@dataclass(frozen=True)
class NullSpace:
    """Protected orthonormal basis ``u`` (n x k for input side, m x k for output side)."""

    u: Tensor
    side: NullSide

    def apply(self, g: Tensor) -> Tensor:
        """``g P`` (input side) or ``P g`` (output side), with ``P = I - u u^T``."""
        if self.side == "input":
            return g - (g @ self.u) @ self.u.T
        return g - self.u @ (self.u.T @ g)

    def coordinates(self, g: Tensor, sub: Subspace) -> Tensor:
        """Coordinates of the projected gradient in ``sub`` without a full-size temporary.

        ``P`` is symmetric, so ``Q^T (g P) = (Q^T g) P`` and ``(P g) Q = P (g Q)``: when ``P`` acts on
        the side the basis does not cover, it is applied to the small coordinate matrix; when
        it acts on the basis side, it is folded into the basis (``P Q``, d x r).
        """
        same_side = (sub.side == "right") == (self.side == "input")
        if same_side:
            return Subspace(self._on_basis(sub.q), sub.side).project(g)
        return self.apply(sub.project(g))

    def _on_basis(self, q: Tensor) -> Tensor:
        return q - self.u @ (self.u.T @ q)


def resolve_general_corpus(cfg: GEMSConfig, model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                           cache_dir: Path | None) -> GeneralCorpus:
    """``gems.general_corpus`` if set, else wikitext-2 valid from shared data, else generated text."""
    if cfg.general_corpus is not None:
        path = Path(cfg.general_corpus).expanduser()
        if not path.is_file():
            raise ValueError(f"gems.general_corpus: {path} is not a readable text file")
        return GeneralCorpus(read_paragraphs(path), f"file:{path}")
    wikitext = shared_file("general", "wikitext2", "valid.txt")
    if wikitext is not None:
        return GeneralCorpus(read_paragraphs(wikitext), f"wikitext2-valid:{wikitext}")
    names = target_parameter_names(model, cfg.target_modules)
    key = f"{model_fingerprint(model, names)[:16]}-{cfg.general_max_tokens}"
    cached = cache_dir / f"general-generated-{key}.json" if cache_dir is not None else None
    if cached is not None and cached.is_file():
        return GeneralCorpus(json.loads(cached.read_text()), f"generated:{cached}")
    texts = generate_general_texts(model, tokenizer, cfg.general_max_tokens)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(json.dumps(texts))
        tmp.replace(cached)
    return GeneralCorpus(texts, f"generated:{cached or 'in-memory'}")


def bases_for_run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, gems_cfg: GEMSConfig,
                  cache_dir: Path | None) -> Bases:
    """What a training run calls: resolve the general corpus, then :func:`build_bases` (cached)."""
    if gems_cfg.k == 0 and gems_cfg.energy is None:
        return Bases({}, {"nullspace": "off (gems.k=0)"})
    corpus = resolve_general_corpus(gems_cfg, model, tokenizer, cache_dir)
    return build_bases(model, corpus.texts, tokenizer, gems_cfg, cache_dir, corpus.source)
