"""GEMSAdamW against a slow, independent reference written straight from DESIGN.md section 5.

The reference works in float64 with explicit loops and full-size matrices (it materialises
``P = I - U U^T``, stores every gradient, and recomputes everything from the equations); the
optimizer works in float32 on coordinates. Both must give the same weights after 20 steps,
for every basis side, with and without null-space, complementary on/off, every moment transfer,
with clipping, weight decay and steps where one task is missing (one of them at a refresh).
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from torch import Tensor, nn

from gems.config import GEMSConfig
from gems.optim import GEMSAdamW

TASKS = ("search", "rec")
STEPS = 20
T_SVD = 4
MISSING = {8: "rec", 13: "search"}  # step -> task absent (8 is a refresh step: rec's refresh waits)
SHAPES = {"m<n": [(8, 12), (6, 9)], "m>n": [(12, 8), (9, 6)], "m=n": [(8, 8), (7, 7)]}
K = 2


# ------------------------------------------------------------------------ the reference
def ref_basis(g: Tensor, rank: int, left: bool) -> Tensor:
    """Top singular vectors, largest-|entry|-positive sign convention."""
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    q = u[:, :rank].clone() if left else vh[:rank].T.clone()
    for j in range(q.shape[1]):
        i = int(q[:, j].abs().argmax())
        if q[i, j] < 0:
            q[:, j] = -q[:, j]
    return q


class Reference:
    """One target weight's GEMS state, kept as plainly as possible."""

    def __init__(self, w: Tensor, ranks: dict[str, int], u: Tensor | None, side: str) -> None:
        self.w = w.double().clone()
        m, n = w.shape
        self.left = m < n
        self.ranks = ranks
        if u is None:
            self.p_in, self.p_out = torch.eye(n, dtype=torch.float64), torch.eye(m, dtype=torch.float64)
        else:
            u = u.double()
            proj = torch.eye(u.shape[0], dtype=torch.float64) - u @ u.T
            self.p_in = proj if side == "input" else torch.eye(n, dtype=torch.float64)
            self.p_out = proj if side == "output" else torch.eye(m, dtype=torch.float64)
        self.q: dict[str, Tensor | None] = {s: None for s in ranks}
        self.m_: dict[str, Tensor] = {}
        self.v_: dict[str, Tensor] = {}
        self.t = {s: 0 for s in ranks}
        self.due = {s: True for s in ranks}

    def null(self, g: Tensor) -> Tensor:
        return self.p_out @ g @ self.p_in

    def coords(self, q: Tensor, g: Tensor) -> Tensor:
        return q.T @ g if self.left else g @ q

    def back(self, q: Tensor, r: Tensor) -> Tensor:
        return q @ r if self.left else r @ q.T


def ref_refresh(layer: Reference, s: str, g: Tensor, mode: str) -> None:
    q_new = ref_basis(g, layer.ranks[s], layer.left)
    q_old = layer.q[s]
    if q_old is not None and mode == "rotate" and layer.t[s] > 0:
        c = q_new.T @ q_old
        m_old, v_old = layer.m_[s], layer.v_[s]
        m_new, v_new = torch.zeros_like(m_old), torch.zeros_like(v_old)
        for i in range(c.shape[0]):
            for k in range(c.shape[1]):
                if layer.left:
                    m_new[i, :] += c[i, k] * m_old[k, :]
                    v_new[i, :] += c[i, k] ** 2 * v_old[k, :]
                else:
                    m_new[:, i] += c[i, k] * m_old[:, k]
                    v_new[:, i] += c[i, k] ** 2 * v_old[:, k]
        layer.m_[s], layer.v_[s] = m_new, v_new
    if mode == "reset" or q_old is None:
        shape = (layer.ranks[s], layer.w.shape[1]) if layer.left else (layer.w.shape[0], layer.ranks[s])
        layer.m_[s] = torch.zeros(shape, dtype=torch.float64)
        layer.v_[s] = torch.zeros(shape, dtype=torch.float64)
        if mode == "reset":
            layer.t[s] = 0
    layer.q[s] = q_new
    layer.due[s] = False


def ref_adam(layer: Reference, s: str, r: Tensor, cfg: GEMSConfig) -> Tensor:
    b1, b2 = cfg.betas
    layer.t[s] += 1
    t = layer.t[s]
    layer.m_[s] = b1 * layer.m_[s] + (1 - b1) * r
    layer.v_[s] = b2 * layer.v_[s] + (1 - b2) * r * r
    m_hat = layer.m_[s] / (1 - b1 ** t)
    v_hat = layer.v_[s] / (1 - b2 ** t)
    return m_hat / (v_hat.sqrt() + cfg.eps)


def ref_step(layers: list[Reference], bias: dict, grads: dict[str, list[Tensor]], bias_grads: dict,
             losses: dict, samples: dict, step: int, cfg: GEMSConfig, lr: float, max_norm: float) -> None:
    present = [t for t in TASKS if samples.get(t, 0) > 0]
    total = sum(samples[t] for t in present)
    w = {t: samples[t] / total for t in present}
    # clipping: the shared (mixed) gradient's global norm, the same factor on both tasks
    shared = [sum(w[t] * grads[t][i].double() for t in present) for i in range(len(layers))]
    shared_bias = sum(w[t] * bias_grads[t].double() for t in present)
    norm = math.sqrt(sum(float((g * g).sum()) for g in shared) + float((shared_bias * shared_bias).sum()))
    c = min(1.0, max_norm / (norm + 1e-6))
    if step % cfg.t_svd == 0:
        for layer in layers:
            layer.due = {s: True for s in layer.due}
    task_g = [{t: c * layer.null(grads[t][i].double()) for t in present} for i, layer in enumerate(layers)]
    for layer, g in zip(layers, task_g, strict=True):
        g_sh = sum(w[t] * g[t] for t in present)
        if layer.due["shared"]:
            ref_refresh(layer, "shared", g_sh, cfg.moment_transfer)
        for t in present:
            if t in layer.ranks and layer.due[t]:
                x = g[t]
                if cfg.complementary:
                    q = layer.q["shared"]
                    x = x - layer.back(q, layer.coords(q, x))
                ref_refresh(layer, t, x, cfg.moment_transfer)
    # gate from loss, in-subspace gradient norm and sample shares
    gn = {}
    for t in present:
        sq = 0.0
        for layer, g in zip(layers, task_g, strict=True):
            for s in ("shared", t):
                if s in layer.ranks:
                    sq += float((layer.coords(layer.q[s], g[t]) ** 2).sum())
        gn[t] = math.sqrt(sq)
    if len(present) == 1:
        gate = {t: float(t in present) for t in TASKS}
    else:
        def share(d: dict) -> dict:
            s = sum(d.values())
            return {k: (v / s if s > 0 else 0.5) for k, v in d.items()}
        ls, gs, ss = share({t: losses[t] for t in TASKS}), share(gn), share({t: samples[t] for t in TASKS})
        gw = cfg.gate_weights
        z = {t: gw.loss * ls[t] + gw.grad_norm * gs[t] + gw.samples * ss[t] for t in TASKS}
        e = {t: math.exp(z[t] / cfg.tau) for t in TASKS}
        gate = {t: e[t] / sum(e.values()) for t in TASKS}
    for layer, g in zip(layers, task_g, strict=True):
        g_sh = sum(w[t] * g[t] for t in present)
        q = layer.q["shared"]
        update = layer.back(q, ref_adam(layer, "shared", layer.coords(q, g_sh), cfg))
        for t in present:
            if t in layer.ranks:
                qt = layer.q[t]
                update = update + gate[t] * layer.back(qt, ref_adam(layer, t, layer.coords(qt, g[t]), cfg))
        update = cfg.alpha * update + cfg.weight_decay * layer.w
        layer.w = layer.w - lr * layer.null(update)
    # non-target parameter: plain AdamW on the clipped shared gradient
    b1, b2 = cfg.betas
    bias["t"] += 1
    gb = c * shared_bias
    bias["m"] = b1 * bias["m"] + (1 - b1) * gb
    bias["v"] = b2 * bias["v"] + (1 - b2) * gb * gb
    m_hat, v_hat = bias["m"] / (1 - b1 ** bias["t"]), bias["v"] / (1 - b2 ** bias["t"])
    bias["w"] = bias["w"] - lr * (m_hat / (v_hat.sqrt() + cfg.eps) + cfg.weight_decay * bias["w"])


# ------------------------------------------------------------------------------ harness
def _orthonormal(rows: int, cols: int, gen: torch.Generator) -> Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q.float()


def _expected_ranks(shape: tuple[int, int], cfg: GEMSConfig, k: int, side: str | None) -> dict[str, int]:
    m, n = shape
    d = min(m, n)
    if side is not None and (m >= n) == (side == "input"):
        d -= k
    ranks = {"shared": min(cfg.r_shared, d)}
    room = d - ranks["shared"] if cfg.complementary else d
    ranks.update({t: min(2, room) for t in TASKS})
    return ranks


def run_case(shape_key: str, side: str | None, complementary: bool, transfer: str,
             keep_full: bool) -> None:
    gen = torch.Generator().manual_seed(zlib.crc32(f"{shape_key}{side}{complementary}{transfer}".encode()))
    cfg = GEMSConfig(r_shared=3, r_search=2, r_rec=2, t_svd=T_SVD, complementary=complementary,
                     moment_transfer=transfer, k=K if side else 0, nullspace_side=side or "input",
                     alpha=0.7, tau=0.7, weight_decay=0.05, svd="full")
    lr, max_norm = 0.01, 3.0
    shapes = SHAPES[shape_key]
    weights = [nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    bias = nn.Parameter(torch.randn(5, generator=gen))
    names = [f"layers.{i}.proj.weight" for i in range(len(shapes))]
    bases = None
    if side:
        bases = {nm: _orthonormal(s[1] if side == "input" else s[0], K, gen)
                 for nm, s in zip(names, shapes, strict=True)}
    opt = GEMSAdamW([*zip(names, weights, strict=True), ("bias", bias)], cfg, lr, names, bases)
    refs = [Reference(w.detach(), _expected_ranks(s, cfg, K, side), bases[nm] if bases else None,
                      side or "input") for w, s, nm in zip(weights, shapes, names, strict=True)]
    for layer, p in zip(refs, weights, strict=True):
        assert opt._layers[p].ranks == layer.ranks
    ref_bias = {"w": bias.detach().double().clone(), "m": torch.zeros(5, dtype=torch.float64),
                "v": torch.zeros(5, dtype=torch.float64), "t": 0}
    for step in range(STEPS):
        present = [t for t in TASKS if MISSING.get(step) != t]
        samples = {t: (int(torch.randint(1, 6, (), generator=gen)) if t in present else 0) for t in TASKS}
        losses = {t: float(torch.rand((), generator=gen)) + 0.5 for t in TASKS}
        grads = {t: [torch.randn(s, generator=gen) for s in shapes] for t in TASKS}
        bias_grads = {t: torch.randn(5, generator=gen) for t in TASKS}
        total = sum(samples.values())
        opt.zero_grad()
        for t in present:  # what two backward passes would leave in .grad
            for p, g in [*zip(weights, grads[t], strict=True), (bias, bias_grads[t])]:
                contribution = samples[t] / total * g
                p.grad = contribution.clone() if p.grad is None else p.grad + contribution
            opt.capture_task_grad(t, keep_full=keep_full)
        opt.set_task_stats({t: losses[t] for t in present}, samples)
        opt.clip_grad_norm_(max_norm)
        opt.step()
        ref_step(refs, ref_bias, grads, bias_grads, losses, samples, step, cfg, lr, max_norm)
        for i, (layer, p) in enumerate(zip(refs, weights, strict=True)):
            err = (p.detach().double() - layer.w).abs().max().item()
            assert err < 1e-5, f"step {step} weight {i}: max |diff| {err:.2e}"
        assert (bias.detach().double() - ref_bias["w"]).abs().max().item() < 1e-5


@pytest.mark.parametrize("transfer", ["rotate", "keep", "reset"])
@pytest.mark.parametrize("complementary", [True, False], ids=["compl", "plain"])
@pytest.mark.parametrize("side", [None, "input"], ids=["no-null", "null-in"])
@pytest.mark.parametrize("shape_key", list(SHAPES))
def test_matches_reference(shape_key: str, side: str | None, complementary: bool, transfer: str) -> None:
    run_case(shape_key, side, complementary, transfer, keep_full=(transfer == "keep"))


@pytest.mark.parametrize("shape_key", list(SHAPES))
def test_matches_reference_output_side_nullspace(shape_key: str) -> None:
    run_case(shape_key, "output", True, "rotate", keep_full=False)


@pytest.mark.parametrize("keep_full", [False, True], ids=["lean", "full"])
def test_lean_and_full_capture_agree_with_reference(keep_full: bool) -> None:
    """Steps that keep full gradients (conflict measured) and lean steps give the same update."""
    run_case("m<n", "input", True, "rotate", keep_full=keep_full)
