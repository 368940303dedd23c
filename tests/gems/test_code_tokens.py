"""Code tokens in the tokenizer and the model: names, starting rows, item -> token ids."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.code_tokens import (
    add_code_tokens,
    code_token,
    code_token_ids,
    code_vocabulary,
    disambiguation_token,
    token_ids_by_item,
)
from gems.model import load_backbone
from gems.semantic_ids import SemanticIds
from tune.config import load_config

Backbone = tuple[PreTrainedModel, PreTrainedTokenizerBase]

# Hand-written codes (L=2, K=3) with one collision, so every kind of token is exercised.
CODES = SemanticIds(item_ids=("a", "b", "c", "d"),
                    codes=torch.tensor([[0, 1, 0], [0, 1, 1], [2, 0, 0], [1, 1, 0]]),
                    levels=2, codebook_size=3, disambiguation_size=2, level_errors=(1.0, 0.5, 0.2))
TITLES = ["Laser printer toner", "Stapler", "Running shoes", ""]


def test_code_vocabulary_is_level_major_then_disambiguation() -> None:
    assert code_token(1, 2) == "<c1_2>" and disambiguation_token(0) == "<d_0>"
    assert code_vocabulary(CODES) == ["<c0_0>", "<c0_1>", "<c0_2>", "<c1_0>", "<c1_1>", "<c1_2>",
                                      "<d_0>", "<d_1>"]


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_code_rows_start_at_their_members_title_mean(tied: bool, tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"model.tiny.tie_word_embeddings={str(tied).lower()}"]).model
    model, tok = load_backbone(cfg, tmp_path)
    before = {name: w.detach().clone() for name, w in
              (("in", model.get_input_embeddings().weight), ("out", model.get_output_embeddings().weight))}
    size = len(tok)

    ids = add_code_tokens(model, tok, CODES, TITLES)

    assert len(tok) == size + CODES.added_tokens
    token = {t: tok.convert_tokens_to_ids(t) for t in code_vocabulary(CODES)}
    assert ids.tolist() == [[token["<c0_0>"], token["<c1_1>"], token["<d_0>"]],
                            [token["<c0_0>"], token["<c1_1>"], token["<d_1>"]],
                            [token["<c0_2>"], token["<c1_0>"], token["<d_0>"]],
                            [token["<c0_1>"], token["<c1_1>"], token["<d_0>"]]]
    assert tok.tokenize("x <c0_2><c1_0><d_0> y").count("<c1_0>") == 1
    weights = {"in": model.get_input_embeddings().weight, "out": model.get_output_embeddings().weight}
    for name in ("in",) if tied else ("in", "out"):
        old = before[name]
        vocab_mean = old[:size].mean(0)
        title = [old[tok(t, add_special_tokens=False)["input_ids"]].mean(0) if t else vocab_mean
                 for t in TITLES]
        want = {"<c0_0>": (title[0] + title[1]) / 2, "<c0_2>": title[2], "<c1_2>": vocab_mean,
                "<c1_1>": (title[0] + title[1] + title[3]) / 3, "<d_1>": title[1],
                "<d_0>": (title[0] + title[2] + title[3]) / 3}
        for t, row in want.items():
            torch.testing.assert_close(weights[name][token[t]], row, rtol=0, atol=1e-6)
        assert torch.equal(weights[name][:size], old[:size]), "existing rows untouched"


def test_adding_codes_twice_changes_nothing(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    first = add_code_tokens(model, tok, CODES, TITLES)
    snapshot, size = model.get_input_embeddings().weight.detach().clone(), len(tok)
    again = add_code_tokens(model, tok, CODES, ["other", "titles", "entirely", "now"])
    assert torch.equal(again, first) and len(tok) == size
    assert torch.equal(model.get_input_embeddings().weight, snapshot)
    assert torch.equal(code_token_ids(tok, CODES), first)


def test_each_item_maps_to_its_code_token_ids(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    ids = add_code_tokens(model, tok, CODES, TITLES)
    by_item = token_ids_by_item(CODES, ids)
    assert list(by_item) == ["a", "b", "c", "d"]
    assert tok.convert_ids_to_tokens(by_item["b"]) == ["<c0_0>", "<c1_1>", "<d_1>"]


def test_bad_code_token_input_is_a_value_error(tiny_model_and_tokenizer: Backbone) -> None:
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="8 code token"):
        code_token_ids(tok, CODES)
    with pytest.raises(ValueError, match="3 titles for 4 items"):
        add_code_tokens(model, tok, CODES, TITLES[:3])
    with pytest.raises(ValueError, match=r"token_ids has shape \(4, 2\)"):
        token_ids_by_item(CODES, torch.zeros(4, 2, dtype=torch.long))
