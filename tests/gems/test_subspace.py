"""Low-rank bases: orthonormal, canonical, complementary, and the randomized SVD finds the same span."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gems.subspace import Subspace, basis_side, choose_svd, top_basis, transfer_moments


def _decaying(m: int, n: int, seed: int) -> torch.Tensor:
    """A gradient-like matrix: singular values decaying geometrically."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=gen)).Q
    s = 0.8 ** torch.arange(min(m, n), dtype=torch.float32)
    return (u * s) @ v.T


@settings(max_examples=40, deadline=None)
@given(m=st.integers(4, 24), n=st.integers(4, 24), r0=st.integers(1, 3), r=st.integers(1, 3),
       method=st.sampled_from(["full", "randomized"]), seed=st.integers(0, 2**16))
def test_bases_are_orthonormal_canonical_and_complementary(m: int, n: int, r0: int, r: int, method: str,
                                                          seed: int) -> None:
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
    side = basis_side(m, n)
    if r0 + r > min(m, n):
        with pytest.raises(ValueError, match="does not fit"):
            top_basis(g, r, side, orthogonal_to=top_basis(g, r0, side), method=method)
        return
    shared = top_basis(g, r0, side, method=method)
    task = top_basis(torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1)), r, side,
                     orthogonal_to=shared, method=method)
    for q in (shared, task):
        torch.testing.assert_close(q.T @ q, torch.eye(q.shape[1]), atol=1e-5, rtol=0)
        top = q.abs().argmax(dim=0)
        assert (q[top, torch.arange(q.shape[1])] > 0).all()  # canonical signs
    assert torch.linalg.matrix_norm(shared.T @ task) < 1e-5


def test_randomized_svd_spans_the_top_singular_subspace_deterministically() -> None:
    g = _decaying(160, 400, seed=0)
    for side in ("left", "right"):
        full = top_basis(g, 16, side, method="full")
        rand = top_basis(g, 16, side, method="randomized")
        assert torch.equal(rand, top_basis(g.clone(), 16, side, method="randomized"))
        gap = torch.linalg.matrix_norm(full @ full.T - rand @ rand.T, ord=2)
        assert gap < 1e-3, f"{side}: projector distance {gap:.2e}"
    assert choose_svd("auto", 16, 160, 400) == "randomized" and choose_svd("auto", 4, 8, 12) == "full"


def test_rotated_moments_are_exact_for_the_first_moment() -> None:
    """If the new basis spans the old one, M rotates exactly: Q_new M_new == Q_old M_old."""
    gen = torch.Generator().manual_seed(3)
    q_old = torch.linalg.qr(torch.randn(10, 4, generator=gen)).Q
    mix = torch.linalg.qr(torch.randn(4, 4, generator=gen)).Q
    q_new = q_old @ mix
    m, v = torch.randn(4, 7, generator=gen), torch.rand(4, 7, generator=gen)
    m_new, v_new = transfer_moments(m, v, q_old, q_new, "left")
    torch.testing.assert_close(Subspace(q_new, "left").back(m_new), Subspace(q_old, "left").back(m))
    assert (v_new >= 0).all()
    torch.testing.assert_close(v_new.sum(0), v.sum(0))  # squared rotation rows sum to one
