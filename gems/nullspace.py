"""Null-space projection: keep each target layer's general-domain behaviour exactly.

``U_k`` (per target weight) spans the top-k eigenvectors of the covariance of the layer's
activations on general-domain text, computed once from the *pretrained* model. Every gradient
and the final update are projected onto the orthogonal complement, ``P = I - U_k U_k^T`` (never
materialised): on the input side ``G <- G P`` so ``(W_t - W_0) U_k = 0`` and ``W_t x = W_0 x`` for
every x in span(U_k); on the output side ``G <- P G`` so ``U_k^T (W_t - W_0) = 0``.

This module holds the projection math and ``build_bases``, which estimates ``U_k`` from a
general-domain corpus and caches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from gems.subspace import Subspace

NullSide = Literal["input", "output"]


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
