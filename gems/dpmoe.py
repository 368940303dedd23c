"""DPMoE (L2Rec, SIGIR 2026; ../shared/seeds/): one frozen backbone read twice, once per view of
an example, each time with that view's personalised low-rank perturbation, and the two last-token
states fused into one user state that scores the catalog.

- **Views.** Semantic: the history (and, for search, the query) as item titles, no item tokens.
  Behavioural: the history as item tokens only. The backbone runs once per view.
- **Experts.** Every target linear layer gets ``n_shared + n_sem + n_beh`` LoRA experts (A, B; B
  starts at zero, so the wrapped model starts as the base model). Shared experts are always on; a
  view's own experts are chosen per example by that view's router, ``softmax(W_v [h_context ;
  h_history])`` over the mean-pooled input embeddings of the prompt's context tokens (task tag,
  query, cue) and of its history tokens, top-k with renormalisation; the other view's experts are off.
- **Fusion.** ``acf``: ``a = sigmoid(W [z_b ; z_s ; z_b * z_s])`` per dimension, ``z = a z_b + (1 - a)
  z_s`` (W starts at zero: a = 0.5); ``mean``; ``concat``: a linear map of ``[z_b ; z_s]``.
- **Scores and loss.** ``z`` times the backbone's output rows of the item tokens, cross-entropy over
  the catalog, plus ``lambda_bpc`` x symmetric in-batch InfoNCE between z_b and z_s, plus
  ``lambda_bal`` x the routers' load-balancing loss (Switch Transformer form, 1.0 when balanced).

Only experts, routers and fusion train; the backbone, item rows included, stays frozen.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from gems.dpmoe_config import DPMoEConfig

VIEWS: tuple[str, ...] = ("semantic", "behavioural")
ADAPTER_FILE, SETTINGS_FILE = "dpmoe_adapter.safetensors", "dpmoe_settings.json"


@dataclass(frozen=True)
class ViewBatch:
    """One view of a left-padded batch: token ids, attention mask, and which tokens are context
    (task tag, query, cue) and which are history, for the router's pooled inputs."""

    input_ids: Tensor
    attention_mask: Tensor
    context_mask: Tensor
    history_mask: Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.input_ids, self.attention_mask, self.context_mask,
                                           self.history_mask)}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(f"ViewBatch tensors must share one [batch, seq] shape, got {shapes}")
        if bool((self.context_mask.bool() & self.history_mask.bool()).any()):
            raise ValueError("a token cannot be both context and history")


def top_k_renormalised(probs: Tensor, k: int) -> Tensor:
    """``probs`` [B, n] -> the k largest per row, rescaled to sum to 1, zeros elsewhere."""
    values, index = probs.topk(k, dim=-1)
    return torch.zeros_like(probs).scatter(-1, index, values / values.sum(-1, keepdim=True))


def load_balance_loss(probs: Tensor, weights: Tensor) -> Tensor:
    """Switch Transformer's auxiliary loss ``n * sum_i f_i P_i`` (f: share of routed slots that went
    to expert i, P: mean router probability); 1.0 when routing is uniform."""
    n = probs.shape[-1]
    chosen = (weights > 0).float()
    f = chosen.sum(0) / chosen.sum().clamp(min=1)
    return n * (f * probs.mean(0)).sum()


def symmetric_info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """In-batch InfoNCE both ways between rows of ``a`` and ``b`` (row i of each is a positive pair)."""
    logits = F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class _Routing:
    """The expert gates of the view being run, read by every wrapped layer ([B, n_experts] or None)."""

    gates: Tensor | None = None


class MoELoRALinear(nn.Module):
    """A frozen linear layer plus gated LoRA experts: ``y = W x + (alpha/r) sum_e g_e B_e A_e x``."""

    def __init__(self, base: nn.Linear, n_experts: int, rank: int, alpha: float, routing: _Routing) -> None:
        super().__init__()
        self.base, self.routing, self.scale = base, routing, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(n_experts, rank, base.in_features, device=device))
        self.lora_b = nn.Parameter(torch.zeros(n_experts, base.out_features, rank, device=device))
        for e in range(n_experts):  # as peft initialises LoRA's A
            nn.init.kaiming_uniform_(self.lora_a.data[e], a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        gates = self.routing.gates
        if gates is None:
            return y
        # only the experts some row of the batch uses (the other view's are off): 4 of 7 by default
        active = (gates != 0).any(0).nonzero().squeeze(-1)
        a = self.lora_a.index_select(0, active).to(x.dtype)
        b = self.lora_b.index_select(0, active).to(x.dtype)
        xa = torch.einsum("bti,eri->bter", x, a) * gates.index_select(1, active).to(x.dtype)[:, None, :, None]
        return y + self.scale * torch.einsum("bter,eor->bto", xa, b)


class ViewRouter(nn.Module):
    """Personalised router of one view: pooled context and history embeddings -> top-k expert weights."""

    def __init__(self, d_model: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.proj, self.top_k = nn.Linear(2 * d_model, n_experts), top_k
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h_context: Tensor, h_history: Tensor) -> tuple[Tensor, Tensor]:
        """(weights: top-k renormalised [B, n], probs: the full softmax [B, n])."""
        probs = torch.softmax(self.proj(torch.cat([h_context, h_history], -1).float()), -1)
        return top_k_renormalised(probs, self.top_k), probs


class CrossViewFusion(nn.Module):
    """z from the behavioural and semantic states (``acf`` | ``mean`` | ``concat``); starts at the mean."""

    def __init__(self, d_model: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode == "acf":
            self.gate = nn.Linear(3 * d_model, d_model)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        elif mode == "concat":
            self.proj = nn.Linear(2 * d_model, d_model)
            with torch.no_grad():
                eye = torch.eye(d_model) / 2
                self.proj.weight.copy_(torch.cat([eye, eye], 1))
                self.proj.bias.zero_()

    def forward(self, z_b: Tensor, z_s: Tensor) -> Tensor:
        if self.mode == "acf":
            a = torch.sigmoid(self.gate(torch.cat([z_b, z_s, z_b * z_s], -1)))
            return a * z_b + (1 - a) * z_s
        if self.mode == "concat":
            return self.proj(torch.cat([z_b, z_s], -1))
        return (z_b + z_s) / 2


@dataclass
class DPMoEOutput:
    logits: Tensor   # [B, n_items], fp32
    z_b: Tensor      # behavioural last-token state [B, d]
    z_s: Tensor      # semantic last-token state [B, d]
    balance: Tensor  # mean of the two routers' load-balancing losses


def _pooled(emb: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(emb.dtype)[..., None]
    return (emb * m).sum(1) / m.sum(1).clamp(min=1)


class DPMoEModel(nn.Module):
    """The frozen backbone wrapped with DPMoE experts, routers and fusion (build once per run)."""

    def __init__(self, backbone: nn.Module, settings: DPMoEConfig, target_modules: Sequence[str],
                 item_token_ids: Sequence[int], titles: Mapping[str, str] | None = None) -> None:
        """``titles`` (item id -> title): what the semantic view shows of each history item."""
        super().__init__()
        self.backbone, self.settings = backbone, settings
        self.titles = dict(titles) if titles is not None else None
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.routing = _Routing()
        wrapped = self._wrap(set(target_modules))
        if not wrapped:
            raise ValueError(f"dpmoe: no nn.Linear named {sorted(target_modules)} in the backbone")
        d = int(backbone.config.hidden_size)
        self.routers = nn.ModuleDict({"semantic": ViewRouter(d, settings.n_sem, settings.top_k),
                                      "behavioural": ViewRouter(d, settings.n_beh, settings.top_k)})
        self.fusion = CrossViewFusion(d, settings.fusion)
        device = backbone.get_input_embeddings().weight.device
        self.routers.to(device)
        self.fusion.to(device)
        self.register_buffer("item_token_ids", torch.as_tensor(list(item_token_ids), dtype=torch.long,
                                                               device=device), persistent=False)

    def _wrap(self, names: set[str]) -> int:
        s, count = self.settings, 0
        head = self.backbone.get_output_embeddings()
        for parent in list(self.backbone.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and child_name in names and child is not head:
                    experts = MoELoRALinear(child, s.n_experts, s.rank, s.alpha, self.routing)
                    setattr(parent, child_name, experts)
                    count += 1
        return count

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _gates(self, view: str, weights: Tensor) -> Tensor:
        s = self.settings
        shared = torch.ones(weights.shape[0], s.n_shared, device=weights.device, dtype=weights.dtype)
        sem = weights if view == "semantic" else weights.new_zeros(weights.shape[0], s.n_sem)
        beh = weights if view == "behavioural" else weights.new_zeros(weights.shape[0], s.n_beh)
        return torch.cat([shared, sem, beh], -1)

    def view_state(self, view: str, batch: ViewBatch) -> tuple[Tensor, Tensor]:
        """(last-token state [B, d] of ``view``, that view's load-balancing loss)."""
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, got {view!r}")
        device = self.item_token_ids.device
        ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
        emb = self.backbone.get_input_embeddings()(ids)
        weights, probs = self.routers[view](_pooled(emb, batch.context_mask.to(device)),
                                            _pooled(emb, batch.history_mask.to(device)))
        self.routing.gates = self._gates(view, weights)
        try:
            out = self.backbone.get_decoder()(inputs_embeds=emb, attention_mask=mask,
                                              position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                              use_cache=False)
        finally:
            self.routing.gates = None
        return out.last_hidden_state[:, -1], load_balance_loss(probs, weights)

    def forward(self, semantic: ViewBatch, behavioural: ViewBatch) -> DPMoEOutput:
        z_s, bal_s = self.view_state("semantic", semantic)
        z_b, bal_b = self.view_state("behavioural", behavioural)
        z = self.fusion(z_b, z_s)
        rows = self.backbone.get_output_embeddings().weight[self.item_token_ids]
        with torch.autocast(device_type=z.device.type, enabled=False):  # bf16 scores would tie items
            logits = z.float() @ rows.float().T
        return DPMoEOutput(logits, z_b, z_s, (bal_s + bal_b) / 2)

    def loss(self, out: DPMoEOutput, target_index: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Next-item CE over the catalog (``target_index``: catalog column of each row's answer) +
        lambda_bpc InfoNCE(z_b, z_s) + lambda_bal balance; and the parts, for logging."""
        s = self.settings
        ce = F.cross_entropy(out.logits, target_index.to(out.logits.device))
        bpc = symmetric_info_nce(out.z_b, out.z_s, s.temperature) if out.z_b.shape[0] > 1 else ce * 0
        total = ce + s.lambda_bpc * bpc + s.lambda_bal * out.balance
        return total, {"ce": float(ce.detach()), "bpc": float(bpc.detach()),
                       "balance": float(out.balance.detach())}

    def save_pretrained(self, directory: str | Path, safe_serialization: bool = True) -> None:
        """The training checkpoint's model dir: the adapter only (the backbone is the base model)."""
        self.save_adapter(directory)

    def adapter_state_dict(self) -> dict[str, Tensor]:
        """Only what DPMoE trains (experts, routers, fusion): the backbone is the registered base."""
        names = {id(p) for p in self.trainable_parameters()}
        return {n: p.detach().cpu().contiguous() for n, p in self.named_parameters() if id(p) in names}

    def save_adapter(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.adapter_state_dict(), str(directory / ADAPTER_FILE))
        (directory / SETTINGS_FILE).write_text(self.settings.model_dump_json(indent=1))

    def load_adapter(self, directory: str | Path) -> None:
        """Load a saved adapter; refuses one saved with other settings or for another backbone shape."""
        directory = Path(directory)
        saved = DPMoEConfig.model_validate(json.loads((directory / SETTINGS_FILE).read_text()))
        if saved != self.settings:
            raise ValueError(f"{directory}: adapter saved with {saved}, this model has {self.settings}")
        state = load_file(str(directory / ADAPTER_FILE))
        expected = self.adapter_state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError(f"{directory}: adapter tensors do not match this backbone's layers")
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
