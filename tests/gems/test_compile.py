"""``train.compile``: compiled decoder layers train like eager ones and keep every name."""

from __future__ import annotations

import copy

import pytest
import torch
from optim_helpers import mixed_batches

from gems.compile import compile_decoder_layers, decoder_layers
from gems.config import GEMSConfig
from gems.methods import build_method


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gems", "adamw"])
def test_compiled_layers_take_the_same_steps_as_eager(tiny_model_and_tokenizer, method: str) -> None:
    eager, tok = tiny_model_and_tokenizer
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in eager.named_parameters()]
    start = {n: p.detach().clone() for n, p in eager.named_parameters()}
    cfg = GEMSConfig(method=method, r_shared=4, t_svd=2, k=0)
    runs = {}
    for label, model in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(0)
        built = build_method(model, cfg, 1e-3)
        if label == "compiled":
            assert compile_decoder_layers(built.model) == len(decoder_layers(eager)) > 0
            # each layer now calls through torch.compile (nn.Module.compile's hook), the rest stays eager
            assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
            assert model._compiled_call_impl is None
        # three steps with different sequence lengths: one dynamic graph, no shape-specialised break
        runs[label] = [built.train_step(mixed_batches(len(tok), seed=s, seq=8 + 3 * s)).mixed_loss
                       for s in range(3)]
    assert [n for n, _ in compiled.named_parameters()] == names
    assert list(compiled.state_dict()) == list(eager.state_dict())
    torch.testing.assert_close(torch.tensor(runs["compiled"]), torch.tensor(runs["eager"]),
                               rtol=1e-4, atol=1e-4)
    # Adam normalises each element, so near-zero gradients may round differently: compare updates
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        eager_update, compiled_update = a.detach() - start[name], b.detach() - start[name]
        gap = float((compiled_update - eager_update).norm())
        assert gap <= 0.02 * float(eager_update.norm()) + 1e-7, f"{name}: updates differ by {gap:.3g}"


def test_compile_refuses_a_model_without_decoder_layers() -> None:
    with pytest.raises(ValueError, match="no decoder layers"):
        compile_decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))
