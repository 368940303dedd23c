"""DPMoE: the wrapped model starts as the base model, routing is top-k renormalised per view, only
experts/routers/fusion train, and a saved adapter loads back to the same scores."""

from __future__ import annotations

import copy

import pytest
import torch

from gems.dpmoe import (
    DPMoEModel,
    ViewBatch,
    load_balance_loss,
    symmetric_info_nce,
    top_k_renormalised,
)
from gems.dpmoe_config import DPMoEConfig
from gems.model import add_item_tokens

torch.set_num_threads(1)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _views(vocab: int, item_ids: list[int], rows: int = 4, seq: int = 10, seed: int = 0
           ) -> tuple[ViewBatch, ViewBatch]:
    """Two differently tokenised views of the same rows: first half history, then context; row 0 padded."""
    gen = torch.Generator().manual_seed(seed)

    def view(ids: torch.Tensor) -> ViewBatch:
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        history = torch.zeros_like(ids)
        history[:, 2:seq // 2] = 1
        context = mask * (1 - history)
        return ViewBatch(ids, mask, context, history)

    words = torch.randint(5, vocab, (rows, seq), generator=gen)
    tokens = words.clone()
    tokens[:, 2:seq // 2] = torch.tensor(item_ids)[torch.randint(0, len(item_ids), (rows, seq // 2 - 2),
                                                                 generator=gen)]
    return view(words), view(tokens)


@pytest.fixture
def wrapped(tiny_model_and_tokenizer, tiny_items):
    model, tok = tiny_model_and_tokenizer
    item_ids = add_item_tokens(model, tok, tiny_items)
    base = copy.deepcopy(model)
    dp = DPMoEModel(model, DPMoEConfig(n_sem=3, n_beh=2, rank=4), TARGETS, item_ids)
    return dp, base, item_ids, len(tok)


def test_zero_experts_give_the_base_model(wrapped) -> None:
    dp, base, item_ids, vocab = wrapped
    sem, beh = _views(vocab, item_ids)
    with torch.no_grad():
        out = dp(sem, beh)
        ref = base(input_ids=sem.input_ids, attention_mask=sem.attention_mask,
                   position_ids=(sem.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
        same = dp(sem, sem)  # one view twice: the fused state is that view's state
    assert out.z_s.shape == out.z_b.shape and not torch.allclose(out.z_s, out.z_b)
    assert torch.allclose(same.logits, ref[:, item_ids].float(), atol=1e-5)


def test_top_k_renormalisation_and_balance() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    w = top_k_renormalised(probs, 2)
    assert torch.allclose(w[0], torch.tensor([0.625, 0.375, 0.0]))
    # a tie for the second place: either 0.1 may win, the weights are the same
    assert (w[1] > 0).sum() == 2 and torch.isclose(w[1, 2], torch.tensor(0.8 / 0.9))
    assert torch.allclose(w.sum(-1), torch.ones(2))
    uniform = torch.full((4, 3), 1 / 3)
    assert float(load_balance_loss(uniform, top_k_renormalised(uniform + torch.eye(4, 3) * 1e-3, 1))) == \
        pytest.approx(1.0, abs=0.01)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert float(load_balance_loss(collapsed, top_k_renormalised(collapsed, 1))) == pytest.approx(3.0)


def test_each_view_uses_shared_and_its_own_experts_only(wrapped) -> None:
    dp, _, item_ids, vocab = wrapped
    sem, beh = _views(vocab, item_ids, seed=1)
    gates = dp._gates("semantic", top_k_renormalised(torch.rand(4, 3), 2))
    assert gates.shape == (4, 1 + 3 + 2)
    assert torch.equal(gates[:, 0], torch.ones(4)) and torch.equal(gates[:, 4:], torch.zeros(4, 2))
    assert torch.allclose(gates[:, 1:4].sum(-1), torch.ones(4)) and ((gates[:, 1:4] > 0).sum(-1) == 2).all()
    with torch.no_grad():
        before = dp(sem, beh)
        for layer in dp.modules():
            if hasattr(layer, "lora_b"):
                layer.lora_b[1:4].normal_(std=0.5)  # the semantic experts only
        after = dp(sem, beh)
    assert not torch.allclose(before.z_s, after.z_s)  # the semantic view sees them
    assert torch.allclose(before.z_b, after.z_b)  # the behavioural view does not


def test_only_experts_routers_and_fusion_train(wrapped) -> None:
    dp, _, item_ids, vocab = wrapped
    sem, beh = _views(vocab, item_ids, seed=2)
    names = [n for n, p in dp.named_parameters() if p.requires_grad]
    assert names and all(n.endswith((".lora_a", ".lora_b")) or n.startswith(("routers.", "fusion."))
                         for n in names)
    frozen = {n: p.detach().clone() for n, p in dp.backbone.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW(dp.trainable_parameters(), lr=1e-2)
    target = torch.arange(4) % len(item_ids)
    first = None
    for _ in range(40):
        loss, parts = dp.loss(dp(sem, beh), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else parts["ce"]
    # item rows stay frozen (as the method prescribes): on the tiny random backbone their small norm
    # caps how far the logits can spread, so the loss falls by about a quarter, not to zero
    assert parts["ce"] < first * 0.85
    assert all(torch.equal(p, frozen[n]) for n, p in dp.backbone.named_parameters() if n in frozen)


def test_adapter_round_trip_and_mismatch(wrapped, tmp_path, tiny_model_and_tokenizer) -> None:
    dp, base, item_ids, vocab = wrapped
    sem, beh = _views(vocab, item_ids, seed=3)
    with torch.no_grad():
        for p in dp.trainable_parameters():
            p.add_(torch.randn_like(p) * 0.05)
        expected = dp(sem, beh).logits
    dp.save_adapter(tmp_path / "adapter")
    fresh = DPMoEModel(copy.deepcopy(base), DPMoEConfig(n_sem=3, n_beh=2, rank=4), TARGETS, item_ids)
    fresh.load_adapter(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(sem, beh).logits, expected, atol=1e-5)
    other = DPMoEModel(copy.deepcopy(base), DPMoEConfig(n_sem=3, n_beh=2, rank=2), TARGETS, item_ids)
    with pytest.raises(ValueError, match="adapter saved with"):
        other.load_adapter(tmp_path / "adapter")


def test_info_nce_prefers_aligned_pairs() -> None:
    a = torch.eye(4)
    assert float(symmetric_info_nce(a, a, 0.1)) < float(symmetric_info_nce(a, a.roll(1, 0), 0.1))


@pytest.mark.parametrize("bad, field", [({"top_k": 4}, "top_k"), ({"n_sem": 0}, "n_sem"),
                                        ({"fusion": "sum"}, "fusion"), ({"lambda_bpc": -1.0}, "lambda_bpc")])
def test_bad_settings_are_named(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DPMoEConfig(**bad)


def test_the_config_refuses_what_changes_dpmoes_loss_and_leaves_out_what_does_not_apply() -> None:
    from gems.config import ConfigError
    from tune.config import load_config

    for bad in ("train.token_weighting=talr", "train.loss=vocab"):
        with pytest.raises(ConfigError, match=f"gems.method=dpmoe cannot use {bad}"):
            load_config("tiny", ["gems.method=dpmoe", bad])
    # item-row and history-target options of a shared budget do not apply: the config still loads
    cfg = load_config("tiny", ["gems.method=dpmoe", "train.history_targets=4", "train.item_lr_scale=3"])
    assert cfg.gems.method == "dpmoe" and cfg.dpmoe.top_k == 2


def test_experts_no_row_uses_are_skipped_without_changing_the_output() -> None:
    from gems.dpmoe import MoELoRALinear, _Routing

    torch.manual_seed(0)
    routing = _Routing()
    layer = MoELoRALinear(torch.nn.Linear(6, 5), n_experts=4, rank=2, alpha=4.0, routing=routing)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(3, 7, 6)
    routing.gates = torch.tensor([[1.0, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.4], [1.0, 0.2, 0.0, 0.8]])
    got = layer(x)
    g = routing.gates
    dense = layer.base(x) + 2.0 * sum(g[:, e, None, None] * (x @ layer.lora_a[e].T @ layer.lora_b[e].T)
                                      for e in range(4))
    assert torch.allclose(got, dense, atol=1e-5)
    got.sum().backward()
    assert torch.equal(layer.lora_a.grad[2], torch.zeros_like(layer.lora_a.grad[2]))  # expert 2 unused
