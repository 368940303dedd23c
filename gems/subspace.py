"""Low-rank gradient subspaces: basis from an SVD, projection into it and back (GaLore-style sides).

A weight ``W`` (m x n) gets a *left* basis ``Q`` (m x r, ``R = Q^T G``) when m < n, else a *right*
basis (n x r, ``R = G Q``): the basis always lives on the smaller side, so the optimizer state
``R`` is r x max(m, n). Bases are plain tensors (the optimizer state holds them); ``Subspace`` is a
thin view that knows which side they act on.

Signs of singular vectors are arbitrary; bases are made canonical (the largest-magnitude entry
of each column is positive) so that two ranks, two devices or two precisions that compute the
same subspace also get the same coordinates, which the moment transfer and DDP rely on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Side = Literal["left", "right"]


def basis_side(m: int, n: int) -> Side:
    """Left basis (over the m rows) when m < n, else right (over the n columns), as GaLore."""
    return "left" if m < n else "right"


def canonical_signs(q: Tensor) -> Tensor:
    """Flip columns so that each one's largest-magnitude entry is positive (deterministic bases);
    zero columns (directions a basis does not use) stay zero."""
    idx = q.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(q.gather(0, idx))
    signs[signs == 0] = 1
    return q * signs


@dataclass(frozen=True)
class Subspace:
    """An orthonormal basis ``q`` (d x r) on one side of an m x n weight."""

    q: Tensor
    side: Side

    def project(self, g: Tensor) -> Tensor:
        """Coordinates of ``g`` in the subspace: r x n (left) or m x r (right)."""
        return self.q.T @ g if self.side == "left" else g @ self.q

    def back(self, r: Tensor) -> Tensor:
        """Full-size matrix from coordinates (the adjoint of :meth:`project`)."""
        return self.q @ r if self.side == "left" else r @ self.q.T

    def remove_from(self, g: Tensor) -> Tensor:
        """``g`` with its component in this subspace removed: (I - Q Q^T) g or g (I - Q Q^T)."""
        return g - self.back(self.project(g))


SvdMethod = Literal["full", "randomized"]
OVERSAMPLE = 8
POWER_ITERATIONS = 2


def choose_svd(requested: str, rank: int, m: int, n: int) -> SvdMethod:
    """``gems.svd``: auto = randomized when rank <= min(m, n) / 4 (where it pays off), else full."""
    if requested == "auto":
        return "randomized" if 4 * rank <= min(m, n) else "full"
    if requested not in ("full", "randomized"):
        raise ValueError(f"gems.svd must be auto, full or randomized, got {requested!r}")
    return requested  # type: ignore[return-value]


def _left_singular_vectors(a: Tensor, rank: int, method: SvdMethod) -> tuple[Tensor, Tensor]:
    """Top-``rank`` left singular vectors of ``a`` (d x o) and their singular values.

    ``randomized``: a range finder with power iterations (Halko et al. 2011) whose test matrix is
    seeded from the shape, so every rank and device computes the same basis without sharing RNG.
    """
    if method == "full":
        u, s, _ = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank]
    d, o = a.shape
    width = min(rank + OVERSAMPLE, d, o)
    gen = torch.Generator().manual_seed(1_000_003 * d + o)
    y = a @ torch.randn(o, width, generator=gen).to(device=a.device, dtype=a.dtype)
    for _ in range(POWER_ITERATIONS):
        y = torch.linalg.qr(y).Q
        y = a @ (a.T @ y)
    q = torch.linalg.qr(y).Q
    u_small, s, _ = torch.linalg.svd(q.T @ a, full_matrices=False)
    return (q @ u_small)[:, :rank], s[:rank]


def top_basis(g: Tensor, rank: int, side: Side, orthogonal_to: Tensor | None = None,
              method: SvdMethod = "full", threshold: float = 0.0) -> Tensor:
    """Top-``rank`` singular vectors of ``g`` on ``side`` (float32, d x rank), canonical signs.

    With ``orthogonal_to`` (orthonormal columns, possibly some zero, on the same side: the shared
    basis for complementary task subspaces, the protected null-space directions), the component
    of ``g`` in that span is removed first and the result re-orthogonalised against it, so that
    ``orthogonal_to^T Q = 0`` holds to float precision.

    ``threshold``: a direction is kept only if its singular value is at least ``threshold * ||g||_F``
    (the Frobenius norm bounds the largest singular value and costs nothing). The other columns
    are zero, so the subspace's rank shrinks to what the gradient holds: with fewer target tokens
    than rank, or a task gradient that the shared basis already explains, the leftover singular
    vectors are float noise, which Adam's normalisation would otherwise turn into full-size moves.
    """
    g32 = g.float()
    dim = g.shape[0] if side == "left" else g.shape[1]
    if rank > dim or (orthogonal_to is not None and rank + orthogonal_to.shape[1] > dim):
        held = 0 if orthogonal_to is None else orthogonal_to.shape[1]
        raise ValueError(f"rank {rank} (+ {held} excluded) does not fit in dimension {dim}")
    reference = float(torch.linalg.vector_norm(g32))
    if orthogonal_to is not None:
        g32 = Subspace(orthogonal_to, side).remove_from(g32)
    q, sigma = _left_singular_vectors(g32 if side == "left" else g32.T, rank, method)
    # No gradient at all: the subspace stays empty.
    keep = sigma >= threshold * reference if reference > 0 else torch.zeros_like(sigma, dtype=torch.bool)
    q = q[:, keep]
    if orthogonal_to is not None and q.shape[1]:
        q = q - orthogonal_to @ (orthogonal_to.T @ q)
        q = torch.linalg.qr(q).Q
    out = torch.zeros(dim, rank, dtype=torch.float32, device=g.device)
    out[:, : q.shape[1]] = canonical_signs(q) if q.shape[1] else q
    return out.contiguous()


def clamp_rank(requested: int, available: int, field: str, where: str) -> int:
    """``min(requested, available)``, logging a warning that names the field when it clamps."""
    if requested > available:
        log.warning("%s=%d exceeds what %s allows (%d); clamped to %d", field, requested, where,
                    available, available)
        return available
    return requested


def transfer_moments(m: Tensor, v: Tensor, q_old: Tensor, q_new: Tensor, side: Side) -> tuple[Tensor, Tensor]:
    """Re-express Adam moments from the old basis in the new one (``moment_transfer: rotate``).

    The first moment is linear in the gradient, so it rotates exactly: ``M' = C M`` (left) or
    ``M C^T`` (right) with ``C = Q_new^T Q_old``. The second moment holds per-coordinate squares,
    which no rotation preserves; we use ``V' = (C * C) V``, the second moment of the rotated
    coordinates if the old ones were uncorrelated with zero mean. It keeps ``V`` on the right
    scale (a reset would make the first post-refresh steps take sign-like, full-size moves)
    and stays non-negative. Directions new to the subspace get ``M' = V' = 0`` from both.
    """
    c = q_new.T @ q_old
    if side == "left":
        return c @ m, (c * c) @ v
    return m @ c.T, v @ (c * c).T


def target_parameter_names(model: nn.Module, target_modules: Iterable[str]) -> list[str]:
    """Weights of ``nn.Linear`` modules inside repeated (numbered) blocks whose name ends with a pattern."""
    suffixes = list(target_modules)
    names = []
    for mod_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
            continue
        parts = mod_name.split(".")
        in_block = any(part.isdigit() for part in parts)
        if in_block and any(mod_name == s or mod_name.endswith("." + s) for s in suffixes):
            names.append(f"{mod_name}.weight")
    return names
