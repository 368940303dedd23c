"""The item-rows-only head gives the full head's catalog loss and gradients, then restores the head."""

from __future__ import annotations

import copy

import torch

from gems.catalog_head import restrictable_head, restricted
from gems.model import add_item_tokens
from gems.prompts import IGNORE_INDEX, encode_training_example, format_prompt
from gems.step import TaskBatch, task_ce_sum
from gems.target_loss import TargetLoss

torch.set_num_threads(1)


def _dense_batch(tok, ids: list[int]) -> TaskBatch:
    """Rec prompts whose history items are targets too (several target positions per row)."""
    items = [(str(i), f"Item {i}") for i in range(20)]
    rows = [encode_training_example(tok, format_prompt("rec", items[n:n + 4], None, 1), str(n + 5), 64,
                                    frozenset(ids)) for n in range(4)]
    width = max(len(r[0]) for r in rows)
    input_ids = torch.tensor([[0] * (width - len(r[0])) + r[0] for r in rows])
    mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in rows])
    labels = torch.tensor([[IGNORE_INDEX] * (width - len(r[1])) + r[1] for r in rows])
    return TaskBatch(input_ids, mask, labels)


def _loss_and_grads(model, batch, loss):
    model.zero_grad(set_to_none=True)
    ce = task_ce_sum(model, batch, loss=loss)
    ce.backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_item_rows_head_matches_the_full_head(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    ids = [int(i) for i in add_item_tokens(model, tok, [(str(i), f"Item {i}") for i in range(20)])]
    batch = _dense_batch(tok, ids)
    loss = TargetLoss.build("catalog", ids, 1.0)
    head = restrictable_head(model)
    assert head is not None
    fast, fast_grads = _loss_and_grads(model, batch, loss)
    # the reference: the same loss with the head forced to run in full (a wrapper is not restricted)
    reference = copy.deepcopy(model)
    reference.lm_head = torch.nn.Sequential(reference.lm_head)
    assert restrictable_head(reference) is None
    full, full_grads = _loss_and_grads(reference, batch, loss)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    renamed = {n.replace("lm_head.0.", "lm_head."): g for n, g in full_grads.items()}
    assert fast_grads.keys() == renamed.keys()
    for name, grad in fast_grads.items():
        torch.testing.assert_close(grad, renamed[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in head.__dict__  # the head is itself again
    logits = model(input_ids=batch.input_ids[:1]).logits
    assert logits.shape[-1] == len(tok)


def test_restriction_enters_false_without_a_catalog_or_plain_head(tiny_model_and_tokenizer) -> None:
    model, _ = tiny_model_and_tokenizer
    with restricted(model, None) as active:
        assert active is False
    with restricted(torch.nn.Linear(2, 2), torch.tensor([0])) as active:
        assert active is False  # no output embeddings to restrict
    with restricted(model, torch.tensor([0, 1])) as active:
        assert active is True
        hidden = torch.randn(3, model.config.hidden_size)
        assert model.get_output_embeddings()(hidden).shape == (3, 2)


def test_lora_head_with_trainable_item_rows_runs_in_full(tiny_model_and_tokenizer) -> None:
    """peft wraps the head to add the trainable item rows' delta: restricting its weight would drop it."""
    from gems.config import GEMSConfig
    from gems.methods import build_method

    model, tok = tiny_model_and_tokenizer
    ids = [int(i) for i in add_item_tokens(model, tok, [(str(i), f"Item {i}") for i in range(20)])]
    lora = build_method(model, GEMSConfig(method="lora", lora_r=4, lora_alpha=8), 1e-2, item_token_ids=ids,
                        loss="catalog")
    assert restrictable_head(lora.model) is None
    batch = _dense_batch(tok, ids)
    loss = lora.target_loss
    with torch.no_grad():
        assert torch.isfinite(task_ce_sum(lora.model, batch, loss=loss))
