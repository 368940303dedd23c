"""GEMSAdamW: multi-subspace Adam with an adaptive task gate and null-space projection.

For every target weight W (m x n; the decoder ``nn.Linear`` weights named by
``gems.target_modules``) the optimizer keeps three low-rank subspaces, shared / search / rec,
refreshed from SVDs of the (null-space projected) gradients every ``t_svd`` steps, with Adam
moments inside each. The update is ``dW = U_sh + a_s U_s + a_r U_r`` (``U_x = alpha Q_x N_x``, gates
from :mod:`gems.gate`), projected so that ``(W_t - W_0) U_k = 0``, and ``W <- W - lr dW``. Every
other trainable parameter (embeddings incl. item tokens, norms, lm_head) gets AdamW on the shared
gradient. DESIGN.md section 5 is the specification; ``tests/gems/test_optim_reference.py`` holds an
independent loop implementation that this one must match.

Per-task gradients arrive from two backward passes (see :func:`gems.step.train_step`): the loss of
task x is scaled by ``w_x = N_x / (N_s + N_r)`` (N = target tokens), so ``.grad`` accumulates the
mixed-batch gradient ``g_sh = w_s g_s + w_r g_r``, and :meth:`GEMSAdamW.capture_task_grad` is called
after each task's passes (by :class:`gems.methods.GemsMethod`, which also clips and steps). Memory
(what is kept besides the AdamW state of non-target params):

- persistent state (tensors only, so ``state_dict`` round-trips): per target weight the three
  bases (d x r), their moments (r x max(m, n) each), ``U_k`` and step counters;
- on ordinary steps, no extra full-size gradient: after the first task's passes its gradient is
  reduced to its subspace coordinates and left in ``.grad``, where the second task's passes
  accumulate on top (``.grad`` = g_sh; the second task's coordinates are the difference);
- on SVD refresh steps, and on steps that measure the gradient conflict (it needs
  ``<g_s, g_r>``), the first task's gradient is kept aside while the second one is computed: one
  extra gradient of the target weights, alive until :meth:`step`.

The gate's gradient-norm statistic is the norm of each task's projected gradient inside the
subspaces that act on it (shared + its own), which both kinds of step can compute exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.optim.adamw import adamw as adamw_step

from gems.config import GEMSConfig
from gems.conflict import ConflictSummary, cosine, cosine_from_products, summarize
from gems.gate import TaskStats, task_gate
from gems.nullspace import NullSpace
from gems.subspace import (
    Side,
    basis_side,
    choose_svd,
    clamp_rank,
    target_parameter_names,
    top_basis,
    transfer_moments,
)
from gems.tasks import TASKS

log = logging.getLogger(__name__)

SHARED = "shared"
_INT_KEYS = ("step", "t_")
_BOOL_KEYS = ("due_",)


def _device_sum(values: list[Tensor]) -> float:
    """Sum of scalar tensors with one host sync (they live on the parameters' devices)."""
    if not values:
        return 0.0
    device = values[0].device
    return float(torch.stack([v.to(device=device, dtype=torch.float64) for v in values]).sum())


@dataclass(frozen=True)
class _Layer:
    """Static facts about one target weight."""

    name: str
    m: int
    n: int
    side: Side
    ranks: dict[str, int]  # subspace -> rank; a task subspace absent = not used for this weight

    @property
    def subspaces(self) -> tuple[str, ...]:
        return tuple(self.ranks)

    def coord_shape(self, rank: int) -> tuple[int, int]:
        return (rank, self.n) if self.side == "left" else (self.m, rank)


@dataclass
class StepReport:
    """What the last :meth:`GEMSAdamW.step` decided (read by the training step for logging)."""

    gate: dict[str, float]
    grad_norms: dict[str, float]
    refreshed: bool
    clip_coef: float
    conflict_before: ConflictSummary | None = None
    conflict_after: ConflictSummary | None = None
    ranks: dict[str, float] = field(default_factory=dict)  # after a refresh: mean used rank per subspace


@dataclass
class _Pending:
    """Per-step scratch, never saved: captured gradients or their coordinates."""

    captured: list[str] = field(default_factory=list)
    full: bool = False
    stash: dict[Tensor, dict[str, Tensor]] = field(default_factory=dict)
    coords: dict[Tensor, dict[str, dict[str, Tensor]]] = field(default_factory=dict)
    sq: dict[Tensor, dict[str, Tensor]] = field(default_factory=dict)
    shared_sq: dict[Tensor, Tensor] = field(default_factory=dict)
    stats: dict[str, tuple[float, float]] | None = None  # task -> (loss, samples)
    clip_coef: float = 1.0


class GEMSAdamW(torch.optim.Optimizer):
    """GEMS optimizer; see the module docstring. ``lr`` lives in the param groups (schedulers work)."""

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], cfg: GEMSConfig, lr: float,
                 target_names: Iterable[str], bases: Mapping[str, Tensor] | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"train.lr must be > 0, got {lr}")
        self.cfg = cfg
        wanted = set(target_names)
        named = [(n, p) for n, p in named_params if p.requires_grad]
        targets = [(n, p) for n, p in named if n in wanted]
        others = [p for n, p in named if n not in wanted]
        missing = wanted - {n for n, _ in targets}
        if missing:
            raise ValueError(f"target weights not among the trainable parameters: {sorted(missing)[:5]}")
        if not targets:
            raise ValueError(f"gems.target_modules={cfg.target_modules} matches no trainable weight")
        groups = [{"params": [p for _, p in targets], "weight_decay": cfg.weight_decay}]
        if others:
            groups.append({"params": others, "weight_decay": cfg.weight_decay})
        super().__init__(groups, {"lr": lr})
        self._layers: dict[Tensor, _Layer] = {}
        self._nullspace: dict[Tensor, NullSpace] = {}
        protect = cfg.k > 0 or cfg.energy is not None
        if protect and bases is None:
            raise ValueError("gems.k > 0 (or gems.energy) needs null-space bases: build them with "
                             "gems.nullspace.build_bases(...) or set gems.k=0")
        warned: set[tuple[str, int, int]] = set()
        for name, p in targets:
            if p.dim() != 2:
                raise ValueError(f"target {name} is not a matrix (shape {tuple(p.shape)})")
            if protect and bases is not None:
                self._nullspace[p] = self._checked_basis(name, p, bases)
            layer = self._make_layer(name, p, warned)
            self._layers[p] = layer
            self._init_target_state(p, layer)
        for p in others:
            self.state[p].update(step=torch.tensor(0), exp_avg=torch.zeros_like(p, dtype=torch.float32),
                                 exp_avg_sq=torch.zeros_like(p, dtype=torch.float32))
        self._pending = _Pending()
        self._stacked: dict[Tensor, Tensor] = {}
        self.last_report: StepReport | None = None

    @classmethod
    def for_model(cls, model: nn.Module, cfg: GEMSConfig, lr: float,
                  bases: Mapping[str, Tensor] | None = None) -> GEMSAdamW:
        """The optimizer for ``model``: targets from ``cfg.target_modules``, everything else AdamW."""
        return cls(model.named_parameters(), cfg, lr, target_parameter_names(model, cfg.target_modules),
                   bases)

    # ------------------------------------------------------------------------------ setup
    def _make_layer(self, name: str, p: Tensor, warned: set[tuple[str, int, int]]) -> _Layer:
        m, n = p.shape
        side = basis_side(m, n)
        d = min(m, n)
        ns = self._nullspace.get(p)
        if ns is not None and (side == "right") == (ns.side == "input"):
            d -= ns.u.shape[1]  # projected gradients have no component along U_k on the basis side

        def clamp(field_name: str, requested: int, available: int) -> int:
            key = (field_name, requested, available)
            if requested > available and key not in warned:
                warned.add(key)
                return clamp_rank(requested, available, field_name, f"weight {name} ({m}x{n})")
            return min(requested, available)

        if d < 1:
            raise ValueError(f"gems.k={ns.u.shape[1] if ns else 0} leaves no trainable direction in "
                             f"{name} ({m}x{n})")
        ranks = {SHARED: clamp("gems.r_shared", self.cfg.r_shared, d)}
        if self.cfg.task_subspaces:
            room = d - ranks[SHARED] if self.cfg.complementary else d
            for task, requested in (("search", self.cfg.rank_search), ("rec", self.cfg.rank_rec)):
                rank = clamp(f"gems.r_{task}", requested, room)
                if rank >= 1:
                    ranks[task] = rank
        return _Layer(name, m, n, side, ranks)

    def _checked_basis(self, name: str, p: Tensor, bases: Mapping[str, Tensor]) -> NullSpace:
        if name not in bases:
            raise ValueError(f"no null-space basis for target weight {name}; rebuild the bases for "
                             "this model and gems.target_modules")
        u = bases[name].to(device=p.device, dtype=torch.float32)
        m, n = p.shape
        dim, what = (n, "input") if self.cfg.nullspace_side == "input" else (m, "output")
        if u.dim() != 2 or u.shape[0] != dim:
            raise ValueError(f"null-space basis of {name} has shape {tuple(u.shape)}, expected "
                             f"({dim}, k) for gems.nullspace_side={self.cfg.nullspace_side}")
        if u.shape[1] > dim:
            raise ValueError(f"gems.k={u.shape[1]} exceeds the {what} dimension {dim} of {name}")
        gram = u.T @ u
        if not torch.allclose(gram, torch.eye(u.shape[1], device=u.device), atol=1e-4):
            raise ValueError(f"null-space basis of {name} is not orthonormal")
        return NullSpace(u.contiguous(), self.cfg.nullspace_side)

    def _init_target_state(self, p: Tensor, layer: _Layer) -> None:
        st = self.state[p]
        st["step"] = torch.tensor(0)
        if p in self._nullspace:
            st["nullspace"] = self._nullspace[p].u
        d = min(layer.m, layer.n)
        for s, rank in layer.ranks.items():
            st[f"q_{s}"] = torch.zeros(d, rank, device=p.device)
            st[f"m_{s}"] = torch.zeros(layer.coord_shape(rank), device=p.device)
            st[f"v_{s}"] = torch.zeros(layer.coord_shape(rank), device=p.device)
            st[f"t_{s}"] = torch.tensor(0)
            st[f"due_{s}"] = torch.tensor(True)

    # --------------------------------------------------------------------------- capture
    def _step_count(self) -> int:
        return int(self.state[next(iter(self._layers))]["step"])

    def refresh_due(self) -> bool:
        """Whether the next :meth:`step` recomputes bases (then full task gradients are kept)."""
        if self._step_count() % self.cfg.t_svd == 0:
            return True
        return any(bool(v) for p in self._layers for k, v in self.state[p].items() if k.startswith("due_"))

    def request_refresh(self) -> None:
        """Recompute every basis at this step's update (or the next step's), as :meth:`step` does at
        every multiple of ``t_svd``; benchmarks call it to time a refresh."""
        for p in self._layers:
            for key, flag in self.state[p].items():
                if key.startswith("due_"):
                    flag.fill_(True)

    def used_ranks(self) -> dict[str, float]:
        """Mean number of basis directions in use per subspace over the target weights: with
        ``gems.rank_threshold`` a subspace holds only what its gradient held at the last refresh."""
        used: dict[str, list[int]] = {}
        for p, layer in self._layers.items():
            for s in layer.subspaces:
                used.setdefault(s, []).append(int((self.state[p][f"q_{s}"].abs().sum(0) > 0).sum()))
        return {s: sum(v) / len(v) for s, v in used.items()}

    def _stacked_basis(self, p: Tensor) -> Tensor:
        """All of a weight's bases side by side (d x sum of ranks), with the null-space projection
        folded in when it acts on the basis side (``P Q``): one matmul then gives every subspace's
        coordinates of ``g P``, and back-projecting through it keeps updates out of span(U_k).
        Cached until the next refresh or state load."""
        cached = self._stacked.get(p)
        if cached is None:
            layer = self._layers[p]
            q = torch.cat([self.state[p][f"q_{s}"] for s in layer.subspaces], dim=1)
            ns = self._nullspace.get(p)
            if ns is not None and self._same_side(layer, ns):
                q = q - ns.u @ (ns.u.T @ q)
            cached = self._stacked[p] = q
        return cached

    @staticmethod
    def _same_side(layer: _Layer, ns: NullSpace) -> bool:
        return (layer.side == "right") == (ns.side == "input")

    def _split(self, layer: _Layer, stacked: Tensor) -> dict[str, Tensor]:
        """Coordinates of the stacked basis -> per subspace (views, no copies)."""
        dim = 0 if layer.side == "left" else 1
        return dict(zip(layer.subspaces, stacked.split(list(layer.ranks.values()), dim=dim), strict=True))

    def _all_coords(self, p: Tensor, g: Tensor) -> dict[str, Tensor]:
        """Every subspace's coordinates of the projected gradient ``g P`` (or ``P g``), one matmul."""
        layer = self._layers[p]
        q = self._stacked_basis(p)
        coords = q.T @ g if layer.side == "left" else g @ q
        ns = self._nullspace.get(p)
        if ns is not None and not self._same_side(layer, ns):
            coords = ns.apply(coords)  # P acts on the side the coordinates keep in full
        return self._split(layer, coords)

    def capture_task_grad(self, task: str, keep_full: bool = False) -> None:
        """Take task ``task``'s (w-scaled) gradient from ``.grad`` of the target weights.

        Call after that task's backward passes, once per task and step, before :meth:`step`.
        Between two captures ``.grad`` must accumulate as ``backward()`` does. ``keep_full`` (set by
        the first capture) keeps the full gradients so :meth:`step` can measure the conflict.
        """
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        pend = self._pending
        if task in pend.captured:
            raise RuntimeError(f"task {task!r} captured twice in one step")
        first = not pend.captured
        if first:
            pend.full = keep_full or self.refresh_due()
        with torch.no_grad():
            for p in self._layers:
                g = p.grad
                if g is None:
                    continue
                if pend.full:
                    self._capture_full(p, task, g)
                else:
                    total = self._all_coords(p, g.float())
                    before = pend.coords.setdefault(p, {})
                    earlier = [before[t] for t in pend.captured if t in before]
                    if earlier:  # .grad holds the earlier tasks' gradients too: subtract theirs
                        total = {s: total[s] - sum(e[s] for e in earlier) for s in total}
                    before[task] = total
                    flat = g.reshape(-1).float()
                    pend.shared_sq[p] = flat @ flat
        pend.captured.append(task)

    def _capture_full(self, p: Tensor, task: str, g: Tensor) -> None:
        pend = self._pending
        stash = pend.stash.setdefault(p, {})
        sq = pend.sq.setdefault(p, {})
        flat = g.reshape(-1).float()
        sq[task] = flat @ flat
        for g_other in stash.values():  # at most one: the other task's
            sq["dot"] = g_other.reshape(-1).float() @ flat
        stash[task] = g
        p.grad = None

    def set_task_stats(self, losses: Mapping[str, float], samples: Mapping[str, float]) -> None:
        """Per-task loss (token-mean CE) and target-token count of this step; missing task = 0 samples."""
        stats = {}
        for t in TASKS:
            n = float(samples.get(t, 0))
            if n < 0:
                raise ValueError(f"negative sample count for {t}: {n}")
            stats[t] = (float(losses.get(t, 0.0)) if n > 0 else 0.0, n)
        if sum(n for _, n in stats.values()) <= 0:
            raise ValueError("set_task_stats: no task has samples")
        self._pending.stats = stats

    # --------------------------------------------------------------------------- clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float | None) -> float:
        """Norm of the shared gradient over all parameters; scale every gradient alike when > max_norm.

        The same factor applies to both task gradients, so the gate and the subspaces see the
        clipped shared gradient as ``w_s c g_s + w_r c g_r``.
        """
        pend = self._pending
        parts: list[Tensor] = []
        for p in self._layers:
            if pend.full:
                sq = pend.sq.get(p, {})
                parts.extend(v if k != "dot" else 2 * v for k, v in sq.items())
            elif p in pend.shared_sq:
                parts.append(pend.shared_sq[p])
        for group in self.param_groups[1:]:
            for p in group["params"]:
                if p.grad is not None:
                    parts.append(torch.linalg.vector_norm(p.grad, dtype=torch.float32) ** 2)
        norm = math.sqrt(max(_device_sum(parts), 0.0))
        coef = 1.0
        if max_norm is not None:
            if max_norm <= 0:
                raise ValueError(f"train.max_grad_norm must be > 0, got {max_norm}")
            coef = min(1.0, max_norm / (norm + 1e-6))
            for group in self.param_groups[1:]:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef)
        pend.clip_coef = coef
        return norm

    # ------------------------------------------------------------------------------- step
    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        self._pending = _Pending()

    @torch.no_grad()
    def step(self, closure=None) -> None:  # noqa: ANN001 - torch's signature
        """One GEMS update from the captured task gradients (closures are not supported)."""
        if closure is not None:
            raise ValueError("GEMSAdamW.step does not take a closure; run the passes, then step()")
        pend = self._pending
        if not pend.captured:
            raise RuntimeError("call capture_task_grad(task) after each task's backward before step()")
        if pend.stats is None:
            raise RuntimeError("call set_task_stats(losses, samples) before step()")
        present = [t for t in TASKS if pend.stats[t][1] > 0]
        total = sum(pend.stats[t][1] for t in present)
        weights = {t: pend.stats[t][1] / total for t in present}
        if self._step_count() % self.cfg.t_svd == 0:
            self.request_refresh()
        refreshed = False
        conflict_before = None
        if pend.full:
            refreshed, per_layer = self._absorb_stash(present)
            conflict_before = summarize(per_layer) if len(present) == 2 else None
        grad_norms = self._task_grad_norms(present, weights, pend.clip_coef)
        gate = task_gate({t: TaskStats(pend.stats[t][0], grad_norms.get(t, 0.0), pend.stats[t][1])
                          for t in TASKS}, self.cfg.gate_weights, self.cfg.tau, self.cfg.fixed_gate)
        after: dict[str, float] = {}
        group = self.param_groups[0]
        for p, layer in self._layers.items():
            rho = self._update_target(p, layer, group, present, weights, gate, pend.clip_coef,
                                      measure=pend.full and len(present) == 2)
            if rho is not None:
                after[layer.name] = rho
        for group in self.param_groups[1:]:
            self._adamw([p for p in group["params"] if p.grad is not None], group)
        self.last_report = StepReport(gate=gate, grad_norms=grad_norms, refreshed=refreshed,
                                      clip_coef=pend.clip_coef, conflict_before=conflict_before,
                                      conflict_after=summarize(after) if after else None,
                                      ranks=self.used_ranks() if refreshed else {})
        self._pending = _Pending()

    def _absorb_stash(self, present: list[str]) -> tuple[bool, dict[str, float]]:
        """Full-gradient steps: conflict before projection, basis refresh, then coordinates."""
        pend = self._pending
        refreshed = False
        rhos: dict[str, float] = {}
        for p, layer in self._layers.items():
            grads = {t: g for t, g in pend.stash.pop(p, {}).items() if t in present}
            sq = pend.sq.get(p, {})
            if len(present) == 2:
                rhos[layer.name] = math.nan
                if len(grads) == 2:
                    rhos[layer.name] = cosine_from_products(float(sq["dot"]), float(sq["search"]),
                                                            float(sq["rec"]))
            ns = self._nullspace.get(p)
            projected = {t: (g.float() if ns is None else ns.apply(g.float())) for t, g in grads.items()}
            st = self.state[p]
            protected = self._protected_on_basis_side(p, layer)
            if projected and bool(st[f"due_{SHARED}"]):
                shared = sum(projected.values())
                self._refresh(p, layer, SHARED, shared, protected)
                refreshed = True
            for t in present:
                if t in layer.ranks and t in projected and bool(st[f"due_{t}"]):
                    excluded = [b for b in (st[f"q_{SHARED}"] if self.cfg.complementary else None,
                                            protected) if b is not None]
                    orth = torch.cat(excluded, dim=1) if excluded else None
                    self._refresh(p, layer, t, projected[t], orth)
                    refreshed = True
            del projected
            pend.coords[p] = {t: self._all_coords(p, g.float()) for t, g in grads.items()}
        return refreshed, rhos

    def _protected_on_basis_side(self, p: Tensor, layer: _Layer) -> Tensor | None:
        """U_k when it lives on the side the bases do (input null space, right basis; output, left):
        bases are then built in its complement, so no basis column is wasted on a direction the
        projection removes anyway."""
        ns = self._nullspace.get(p)
        if ns is None or (layer.side == "right") != (ns.side == "input"):
            return None
        return ns.u

    def _refresh(self, p: Tensor, layer: _Layer, s: str, g: Tensor, orthogonal_to: Tensor | None) -> None:
        st = self.state[p]
        method = choose_svd(self.cfg.svd, layer.ranks[s], layer.m, layer.n)
        q_new = top_basis(g, layer.ranks[s], layer.side, orthogonal_to, method, self.cfg.rank_threshold)
        mode = self.cfg.moment_transfer
        if mode == "rotate" and int(st[f"t_{s}"]) > 0:
            m, v = transfer_moments(st[f"m_{s}"], st[f"v_{s}"], st[f"q_{s}"], q_new, layer.side)
            st[f"m_{s}"].copy_(m)
            st[f"v_{s}"].copy_(v)
        elif mode == "reset":
            st[f"m_{s}"].zero_()
            st[f"v_{s}"].zero_()
            st[f"t_{s}"].zero_()
        st[f"q_{s}"].copy_(q_new)
        st[f"due_{s}"].fill_(False)
        self._stacked.pop(p, None)

    def _task_grad_norms(self, present: list[str], weights: dict[str, float],
                         coef: float) -> dict[str, float]:
        """|| task gradient || inside the subspaces acting on it (shared + own), after projection."""
        sq: dict[str, list[Tensor]] = {t: [] for t in present}
        for by_task in self._pending.coords.values():
            for t in present:
                own = (c for s, c in by_task.get(t, {}).items() if s in (SHARED, t))
                sq[t].extend((c.double() ** 2).sum() for c in own)
        return {t: math.sqrt(_device_sum(sq[t])) * coef / weights[t] for t in present}

    def _adam_direction(self, st: dict[str, Tensor], s: str, r: Tensor) -> Tensor:
        """Bias-corrected ``N = M_hat / (sqrt(V_hat) + eps)`` after folding in coordinates ``r``."""
        beta1, beta2 = self.cfg.betas
        m, v = st[f"m_{s}"], st[f"v_{s}"]
        st[f"t_{s}"] += 1
        t = int(st[f"t_{s}"])
        m.mul_(beta1).add_(r, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(r, r, value=1 - beta2)
        return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + self.cfg.eps)

    def _update_target(self, p: Tensor, layer: _Layer, group: dict, present: list[str],
                       weights: dict[str, float], gate: dict[str, float], coef: float,
                       measure: bool) -> float | None:
        st = self.state[p]
        st["step"] += 1
        coords = self._pending.coords.get(p, {})
        if not coords:
            return math.nan if measure else None
        shared_r = sum(c[SHARED] for t, c in coords.items() if t in present) * coef
        directions = {SHARED: self._adam_direction(st, SHARED, shared_r)}
        scales = {SHARED: 1.0}
        for t in present:
            if t in layer.ranks and t in coords:
                directions[t] = self._adam_direction(st, t, coords[t][t] * (coef / weights[t]))
                scales[t] = gate[t]
        task_directions = [t for t in TASKS if t in directions]
        for s in layer.subspaces:  # a subspace without a direction this step contributes nothing
            if s not in directions:
                directions[s] = torch.zeros(layer.coord_shape(layer.ranks[s]), device=p.device)
                scales[s] = 0.0
        update = self.cfg.alpha * self._back_project(p, layer, {s: scales[s] * directions[s]
                                                               for s in layer.subspaces})
        ns = self._nullspace.get(p)
        if group["weight_decay"] > 0:
            update = update + group["weight_decay"] * p.float()
            if ns is not None:
                update = ns.apply(update)
        p.add_(update.to(p.dtype), alpha=-group["lr"])
        if not measure:
            return None
        if len(task_directions) < 2:
            return None  # no task-specific updates here (single-subspace ablation, rank 0)
        alone = {t: self._back_project(p, layer, {s: d if s == t else torch.zeros_like(d)
                                                  for s, d in directions.items()}) for t in task_directions}
        return cosine(alone["search"], alone["rec"])

    def _back_project(self, p: Tensor, layer: _Layer, coords: Mapping[str, Tensor]) -> Tensor:
        """Sum over subspaces of ``Q_s N_s`` (or ``N_s Q_s^T``) in one matmul through the stacked basis,
        projected so that the result has no component along U_k."""
        stacked = torch.cat([coords[s] for s in layer.subspaces], dim=0 if layer.side == "left" else 1)
        ns = self._nullspace.get(p)
        if ns is not None and not self._same_side(layer, ns):
            stacked = ns.apply(stacked)  # P on the full side, applied to the small coordinates
        q = self._stacked_basis(p)
        return q @ stacked if layer.side == "left" else stacked @ q.T

    def _adamw(self, params: list[Tensor], group: dict) -> None:
        """AdamW on the non-target parameters with torch's fused kernel (one pass over each tensor
        instead of ~10; the embedding with its item rows is most of them), same formula as
        ``torch.optim.AdamW``; the step counters stay integer tensors in the state."""
        if not params:
            return
        beta1, beta2 = self.cfg.betas
        states = [self.state[p] for p in params]
        steps = [st["step"].to(dtype=torch.float32, device=p.device)
                 for st, p in zip(states, params, strict=True)]
        fused = all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                    and p.device.type in ("cpu", "cuda") for p in params)
        adamw_step(
            params, [p.grad for p in params], [st["exp_avg"] for st in states],
            [st["exp_avg_sq"] for st in states], [], steps, fused=fused or None,
            foreach=None if fused else False, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=float(group["lr"]), weight_decay=group["weight_decay"], eps=self.cfg.eps, maximize=False)
        for st in states:
            st["step"] += 1

    # ------------------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, then restore the dtypes torch casts (counters, flags) and the null-space."""
        super().load_state_dict(state_dict)
        for p, st in self.state.items():
            if not isinstance(p, Tensor):
                continue
            for k, v in list(st.items()):
                if k.startswith(_INT_KEYS):
                    st[k] = v.to(device="cpu", dtype=torch.long)
                elif k.startswith(_BOOL_KEYS):
                    st[k] = v.to(device="cpu", dtype=torch.bool)
                else:
                    st[k] = v.to(device=p.device, dtype=torch.float32)
            if p in self._layers and "nullspace" in st:
                self._nullspace[p] = NullSpace(st["nullspace"], self.cfg.nullspace_side)
        self._pending = _Pending()
        self._stacked = {}
