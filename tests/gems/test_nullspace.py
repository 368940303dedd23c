"""Null-space projection: U_k from general-domain activations, the exact invariant, the cache."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from optim_helpers import mixed_batches, snapshot, step_optimizer

import gems.nullspace as nullspace
from gems.config import GEMSConfig
from gems.nullspace import (
    NullSpace,
    activation_covariances,
    bases_for_run,
    build_bases,
    resolve_general_corpus,
    token_windows,
)
from gems.optim import GEMSAdamW, target_parameter_names
from gems.subspace import Subspace

torch.set_num_threads(1)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(2, 9), n=st.integers(2, 9), k=st.integers(1, 4), r=st.integers(1, 4),
       left=st.booleans(), side=st.sampled_from(["input", "output"]), seed=st.integers(0, 2**16))
def test_coordinates_equal_projecting_the_projected_gradient(m: int, n: int, k: int, r: int, left: bool,
                                                             side: str, seed: int) -> None:
    """The cheap path (P folded into small factors) equals Q^T (g P) / (P g) Q computed in full."""
    gen = torch.Generator().manual_seed(seed)
    dim_u = n if side == "input" else m
    dim_q = m if left else n
    k, r = min(k, dim_u), min(r, dim_q)
    u = torch.linalg.qr(torch.randn(dim_u, k, generator=gen, dtype=torch.float64)).Q
    q = torch.linalg.qr(torch.randn(dim_q, r, generator=gen, dtype=torch.float64)).Q
    g = torch.randn(m, n, generator=gen, dtype=torch.float64)
    ns, sub = NullSpace(u, side), Subspace(q, "left" if left else "right")
    torch.testing.assert_close(ns.coordinates(g, sub), sub.project(ns.apply(g)))
    projected = ns.apply(g)
    residual = projected @ u if side == "input" else u.T @ projected
    assert residual.abs().max() < 1e-12


def test_bases_are_top_eigenvectors_of_the_activation_covariance(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    cfg = GEMSConfig(k=6, general_max_tokens=512)
    texts = [f"The {w} of the city was built in the year {1800 + i}." for i, w in
             enumerate(["harbour", "bridge", "cathedral", "museum", "railway", "market"] * 6)]
    bases = build_bases(model, texts, tok, cfg)
    names = target_parameter_names(model, cfg.target_modules)
    assert set(bases) == set(names)
    # an independent covariance: hook one layer by hand
    name = "model.layers.1.mlp.down_proj"
    rows = []
    handle = dict(model.named_modules())[name].register_forward_hook(
        lambda mod, inp, out: rows.append(inp[0].detach().reshape(-1, inp[0].shape[-1]).double()))
    with torch.no_grad():
        for w in token_windows(texts, tok, 512):
            model(input_ids=w.unsqueeze(0), use_cache=False)
    handle.remove()
    x = torch.cat(rows)
    evals, evecs = torch.linalg.eigh(x.T @ x / len(x))
    top = evecs[:, -6:]
    u = bases[name + ".weight"].double()
    assert u.shape == (model.config.intermediate_size, 6)
    torch.testing.assert_close(u.T @ u, torch.eye(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(u @ u.T, top @ top.T, atol=1e-4, rtol=0)  # same span
    # q/k/v read the same input tensor: one covariance, one basis
    qkv = [bases[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(qkv[0], qkv[1]) and torch.equal(qkv[0], qkv[2])
    assert not torch.equal(qkv[0], bases["model.layers.0.self_attn.o_proj.weight"])


def test_k_larger_than_the_layer_fails_naming_the_field(tiny_model_and_tokenizer) -> None:
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match=r"gems\.k=65 exceeds the input dimension 64"):
        build_bases(model, ["Some general text about rivers and mountains."] * 4, tok,
                    GEMSConfig(k=65, general_max_tokens=256))


def test_cache_is_keyed_by_model_corpus_and_k(tiny_model_and_tokenizer, tmp_path: Path) -> None:
    model, tok = tiny_model_and_tokenizer
    texts = ["A short general-domain paragraph about weather and seasons."] * 10
    cfg = GEMSConfig(k=4, general_max_tokens=256)
    first = build_bases(model, texts, tok, cfg, tmp_path)
    cached = build_bases(model, texts, tok, cfg, tmp_path)
    assert len(list(tmp_path.glob("nullspace-*.safetensors"))) == 1
    assert all(torch.equal(first[k], cached[k]) for k in first)
    assert cached.info["corpus_sha256"] == first.info["corpus_sha256"]
    build_bases(model, texts, tok, GEMSConfig(k=5, general_max_tokens=256), tmp_path)
    build_bases(model, texts[:5] + ["Different text."], tok, cfg, tmp_path)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(0.01)  # a fine-tuned model is another model
    build_bases(model, texts, tok, cfg, tmp_path)
    assert len(list(tmp_path.glob("nullspace-*.safetensors"))) == 4


def test_corpus_falls_back_to_cached_generated_text(tiny_model_and_tokenizer, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok = tiny_model_and_tokenizer
    cfg = GEMSConfig(k=4, general_max_tokens=200)
    monkeypatch.setattr(nullspace, "shared_file", lambda *parts: None)  # a machine without shared data
    corpus = resolve_general_corpus(cfg, model, tok, tmp_path)
    assert corpus.source.startswith("generated:")
    assert len(corpus.texts) == len(nullspace.GENERATION_PROMPTS)
    again = resolve_general_corpus(cfg, model, tok, tmp_path)
    assert again.texts == corpus.texts and again.source == corpus.source
    bases = bases_for_run(model, tok, cfg, tmp_path)
    assert bases.info["corpus"] == corpus.source


def test_user_corpus_wins_and_missing_file_is_named(tiny_model_and_tokenizer, tmp_path: Path) -> None:
    model, tok = tiny_model_and_tokenizer
    own = tmp_path / "general.txt"
    own.write_text("First paragraph of my corpus.\n\nSecond paragraph, about gardens.\n")
    corpus = resolve_general_corpus(GEMSConfig(general_corpus=str(own)), model, tok, None)
    assert corpus.source == f"file:{own}" and corpus.texts[1].startswith("Second")
    with pytest.raises(ValueError, match="gems.general_corpus"):
        resolve_general_corpus(GEMSConfig(general_corpus=str(tmp_path / "nope.txt")), model, tok, None)


def _train(model, tok, cfg: GEMSConfig, bases, steps: int) -> None:
    opt = GEMSAdamW.for_model(model, cfg, 1e-3, bases)
    batches = mixed_batches(len(tok), seed=3)
    for _ in range(steps):
        step_optimizer(model, opt, batches, max_grad_norm=1.0, measure_conflict=False)


@pytest.mark.slow
def test_invariant_holds_and_general_outputs_barely_move(tiny_cfg, tmp_path: Path) -> None:
    """50 steps: (W_t - W_0) U_k = 0 for every target; general-domain layer outputs move far less."""
    from gems.model import load_backbone

    names, change = None, {}
    for label, overrides in (("protected", {"energy": 0.99}), ("free", {"k": 0})):
        model, tok = load_backbone(tiny_cfg.model, tmp_path / "models")
        cfg = GEMSConfig(r_shared=8, t_svd=10, general_max_tokens=2048, **overrides)
        names = target_parameter_names(model, cfg.target_modules)
        w0 = snapshot(model, names)
        corpus = resolve_general_corpus(cfg, model, tok, tmp_path)
        covs = activation_covariances(model, token_windows(corpus.texts, tok, 2048), names)
        bases = bases_for_run(model, tok, cfg, tmp_path)
        _train(model, tok, cfg, bases or None, steps=50)
        moved = out = base = 0.0
        for name, p in model.named_parameters():
            if name not in names:
                continue
            delta = (p.detach() - w0[name]).double()
            assert delta.norm() > 0, f"{name} did not train"
            if bases:
                ratio = float((delta @ bases[name].double()).norm() / delta.norm())
                assert ratio < 1e-5, f"{name}: ||dW U_k|| / ||dW|| = {ratio:.2e}"
            c = covs[name].double()
            out += float(torch.trace(delta @ c @ delta.T))
            base += float(torch.trace(w0[name].double() @ c @ w0[name].double().T))
            moved += float(delta.norm() ** 2)
        change[label] = math.sqrt(out / base)
    # relative change of W x over the general activations: protected run < 1/2 of the free run
    # (a random tiny model has a flat activation spectrum; 99% of its energy is protected)
    assert change["protected"] < 0.5 * change["free"], change


def test_output_side_invariant(tiny_model_and_tokenizer, tmp_path: Path) -> None:
    model, tok = tiny_model_and_tokenizer
    cfg = GEMSConfig(r_shared=4, t_svd=3, k=8, nullspace_side="output", general_max_tokens=512)
    names = target_parameter_names(model, cfg.target_modules)
    w0 = snapshot(model, names)
    bases = bases_for_run(model, tok, cfg, tmp_path)
    assert bases["model.layers.0.mlp.up_proj.weight"].shape == (model.config.intermediate_size, 8)
    _train(model, tok, cfg, bases, steps=6)
    for name, p in model.named_parameters():
        if name in names:
            delta = (p.detach() - w0[name]).double()
            assert float((bases[name].double().T @ delta).norm() / delta.norm()) < 1e-5, name
