"""General-domain retention: zero drift for the model itself, measurable damage for a noised one,
item tokens excluded from KL, the fallback corpus, and the MMLU-Redux reader on the real files."""

import copy
from pathlib import Path

import pytest
import torch

import gems.retention as retention
from gems.config import ModelConfig
from gems.model import add_item_tokens, load_backbone
from gems.paths import shared_file
from gems.retention import (
    choice_scores,
    load_mmlu_subset,
    measure_retention,
    mmlu_accuracy,
    original_vocab_size,
)

GENERAL_TEXT = (
    "The river flows through the old town and past the market, where people buy bread, fruit "
    "and fish every morning. In the evening the streets are quiet and the lights of the houses "
    "shine on the water. Children play near the bridge while their parents talk about the "
    "weather, the news and the work of the day. "
) * 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("general") / "held_out.txt"
    path.write_text(GENERAL_TEXT)
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus: Path):
    """Tiny Llama fitted briefly to the general text, so it has something to lose."""
    model, tokenizer = load_backbone(ModelConfig(name_or_path="tiny-llama"),
                                     tmp_path_factory.mktemp("cache"))
    ids = torch.tensor([tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"][:128]])
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model, tokenizer


def _noised(model: torch.nn.Module, scale: float = 0.5) -> torch.nn.Module:
    damaged = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() + 1e-3))
    return damaged


def test_model_has_zero_drift_to_itself(trained, corpus: Path) -> None:
    model, tokenizer = trained
    r = measure_retention(model, model, tokenizer, max_tokens=200, mmlu_questions=0,
                          general_corpus=corpus, window=64)
    assert r.kl == pytest.approx(0.0, abs=1e-6)
    assert r.ppl_base == pytest.approx(r.ppl_tuned) and r.ppl_ratio == pytest.approx(1.0)
    assert r.ppl_base < len(tokenizer) / 4  # the fit worked: far better than uniform
    assert r.item_mass == pytest.approx(0.0, abs=1e-6)
    assert r.tokens > 150 and "held_out.txt" in r.corpus
    assert any("mmlu" in s for s in r.skipped)


def test_noised_model_scores_worse(trained, corpus: Path) -> None:
    model, tokenizer = trained
    r = measure_retention(model, _noised(model), tokenizer, max_tokens=200, mmlu_questions=0,
                          general_corpus=corpus, window=64)
    assert r.ppl_tuned > r.ppl_base and r.ppl_ratio > 1.2
    assert r.kl > 0.05
    metrics = r.metrics()
    assert metrics["retention/kl"] == r.kl and "retention/mmlu_base" not in metrics


def test_item_tokens_are_excluded_from_kl_but_reported_as_item_mass(trained, corpus: Path) -> None:
    base, tokenizer = trained
    tuned, tuned_tokenizer = copy.deepcopy(base), copy.deepcopy(tokenizer)
    add_item_tokens(tuned, tuned_tokenizer, [("7", "river bread"), ("8", "fish market")])
    with torch.no_grad():  # make the item tokens attractive everywhere
        tuned.get_output_embeddings().weight[-2:] = base.get_output_embeddings().weight.mean(0) * 50
        tuned.get_output_embeddings().weight[-2:] += 1.0
    assert original_vocab_size(tuned_tokenizer) == len(tokenizer)
    r = measure_retention(base, tuned, tuned_tokenizer, max_tokens=120, mmlu_questions=0,
                          general_corpus=corpus, window=64)
    assert r.kl == pytest.approx(0.0, abs=1e-5)  # original-vocabulary distributions unchanged
    assert r.item_mass > 0.01 and r.ppl_ratio > 1.0  # but the tuned model wastes mass on items


def test_same_text_as_basis_is_refused(trained, corpus: Path) -> None:
    model, tokenizer = trained
    with pytest.raises(ValueError, match="basis"):
        measure_retention(model, model, tokenizer, max_tokens=64, mmlu_questions=0,
                          general_corpus=corpus, basis_corpus=corpus)


def test_fallback_without_shared_data(trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = trained
    monkeypatch.setattr(retention, "shared_file", lambda *parts: None)  # a fresh machine
    r = measure_retention(model, _noised(model), tokenizer, max_tokens=64, mmlu_questions=5)
    assert r.ppl_base is None and r.ppl_ratio is None and r.mmlu_tuned is None
    assert r.kl is not None and r.kl > 0 and r.tokens >= 64
    assert "greedy" in r.corpus
    assert any(s.startswith("perplexity") for s in r.skipped)
    assert any(s.startswith("mmlu") for s in r.skipped)
    same = measure_retention(model, model, tokenizer, max_tokens=64, mmlu_questions=0)
    assert same.kl == pytest.approx(0.0, abs=1e-6)


def _mmlu_dir() -> Path:
    path = shared_file("general", "mmlu_redux")
    if path is None:
        pytest.skip("MMLU-Redux not in shared data (../shared/data/general/mmlu_redux)")
    return path


def test_mmlu_subset_is_seeded_and_clean() -> None:
    directory = _mmlu_dir()
    a = load_mmlu_subset(directory, 50, seed=0)
    assert len(a) == 50 and a == load_mmlu_subset(directory, 50, seed=0)
    assert a != load_mmlu_subset(directory, 50, seed=1)
    assert all(len(q.choices) == 4 and 0 <= q.answer < 4 for q in a)
    assert len({q.subject for q in a}) > 10  # drawn across subjects
    subjects = {q.subject for q in load_mmlu_subset(directory, 100_000)}
    assert "moral scenarios" in subjects  # the cp1252 file is read too
    assert len(subjects) == 57


def test_mmlu_choice_scores_equal_naive_full_sequence_scoring(trained) -> None:
    model, tokenizer = trained
    questions = load_mmlu_subset(_mmlu_dir(), 3, seed=0)
    for q in questions:
        fast = choice_scores(model, tokenizer, q, max_len=512)
        prompt = tokenizer(retention._mmlu_prompt(q), add_special_tokens=False)["input_ids"]
        for choice, score in zip(q.choices, fast, strict=True):
            cont = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            naive = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(cont))
            assert score == pytest.approx(naive / (len(choice) + 1), abs=1e-4)
    acc = mmlu_accuracy(model, tokenizer, questions)
    assert acc * 3 == round(acc * 3) and 0.0 <= acc <= 1.0


def test_real_wikitext_test_text_is_used_by_default(trained) -> None:
    if shared_file("general", "wikitext2", "test.txt") is None:
        pytest.skip("wikitext-2 not in shared data (../shared/data/general/wikitext2)")
    model, tokenizer = trained
    r = measure_retention(model, model, tokenizer, max_tokens=128, mmlu_questions=2, window=64)
    assert "test.txt" in r.corpus and r.tokens >= 128
    assert r.mmlu_questions == 2 and r.mmlu_base == r.mmlu_tuned
    assert r.skipped == []


def test_fallback_prompts_differ_from_basis_prompts() -> None:
    from gems.nullspace import GENERATION_PROMPTS

    def openings(prompts: tuple[str, ...]) -> set[str]:
        return {" ".join(p.lower().split()[:3]) for p in prompts}

    assert not openings(retention.FALLBACK_PROMPTS) & openings(GENERATION_PROMPTS)


def test_fallback_windows_decode_as_one_batch_and_match_one_prompt_at_a_time(trained) -> None:
    """The batched fallback text is each prompt's own greedy continuation: BOS + prompt + exactly
    its new tokens, no padding left in, the same tokens as decoding that prompt alone."""
    from gems.general_text import greedy_continuations

    model, tokenizer = trained
    prompts = ("A short one", "A much longer opening sentence about rivers and valleys", "Mid length text")
    windows = retention.greedy_general_windows(model, tokenizer, 3 * 12, prompts)
    pad = tokenizer.pad_token_id or tokenizer.eos_token_id or 0
    for prompt, window in zip(prompts, windows, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert window.shape == (1 + len(prompt_ids) + 12,)
        assert window[0] == tokenizer.bos_token_id and window[1:1 + len(prompt_ids)].tolist() == prompt_ids
        alone = greedy_continuations(model, tokenizer, [prompt], 12, pad, bos=True, min_new_tokens=12)[0]
        assert torch.equal(window, alone.cpu())
