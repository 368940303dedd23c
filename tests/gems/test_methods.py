"""Every method trains tiny-llama through the same step interface and lowers the loss on a fixed batch."""

from __future__ import annotations

import pytest
import torch
from optim_helpers import mixed_batches, snapshot

from gems.config import GEMSConfig
from gems.model import add_item_tokens
from gems.step import task_ce_sum

torch.set_num_threads(1)


def _loss(model, batches) -> float:
    with torch.no_grad():
        ce = sum(float(task_ce_sum(model, b)) for bs in batches.values() for b in bs)
    return ce / sum(b.target_tokens for bs in batches.values() for b in bs)


@pytest.mark.parametrize("method", ["gems", "adamw", pytest.param("lora", marks=pytest.mark.slow), "galore"])
def test_method_lowers_the_loss(tiny_model_and_tokenizer, tiny_items, method: str) -> None:
    from gems.methods import build_method

    model, tok = tiny_model_and_tokenizer
    item_ids = add_item_tokens(model, tok, tiny_items)
    batches = mixed_batches(len(tok), seed=11)
    for task_batches in batches.values():  # targets are item tokens, as in the real data
        for b in task_batches:
            b.labels[:, -1] = torch.tensor(item_ids)[torch.arange(len(b.labels)) % len(item_ids)]
            b.input_ids[:, -1] = b.labels[:, -1]
    cfg = GEMSConfig(method=method, r_shared=4, t_svd=3, k=0, lora_r=4, lora_alpha=8)
    before = snapshot(model)
    lm = build_method(model, cfg, lr=1e-2, bases=None, item_token_ids=item_ids)
    start = _loss(lm.model, batches)
    for step in range(8):
        stats = lm.train_step(batches, max_grad_norm=1.0, measure_conflict=step % 2 == 0)
        assert set(stats.loss) == {"search", "rec"}
    end = _loss(lm.model, batches)
    assert end < 0.8 * start, f"{method}: loss {start:.3f} -> {end:.3f}"
    assert stats.conflict_before is None or -1 <= stats.conflict_before.mean_rho <= 1
    if method == "lora":
        merged = lm.merged_model()
        emb = merged.get_input_embeddings().weight
        others = [i for i in range(emb.shape[0]) if i not in set(item_ids)]
        assert torch.equal(emb[others], before["model.embed_tokens.weight"][others])  # frozen vocabulary
        assert not torch.equal(emb[item_ids], before["model.embed_tokens.weight"][item_ids])  # items learn
        assert torch.isclose(torch.tensor(_loss(merged, batches)), torch.tensor(end), rtol=1e-4)
        assert lm.trainable_parameters() < sum(p.numel() for p in merged.parameters()) / 4


def test_invalid_learning_rate_is_named() -> None:
    from gems.methods import build_method

    with pytest.raises(ValueError, match="train.lr"):
        build_method(torch.nn.Linear(2, 2), GEMSConfig(method="adamw"), lr=0.0)
