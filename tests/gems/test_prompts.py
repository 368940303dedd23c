"""Prompt text (contract 3) and its tokenization: chat template, truncation that keeps the task tag,
the query and the answer cue, and teacher-forcing labels."""

from __future__ import annotations

import copy

import pytest

from gems.items import item_token
from gems.model import add_item_tokens
from gems.prompts import (
    IGNORE_INDEX,
    encode_prompt,
    encode_training_example,
    format_prompt,
    history_entry,
)

HISTORY = [("3", "Heavy Duty Stapler Pro"), ("9", "Black Laser Toner Cartridge"), ("4", "Blue Pen")]


def test_rec_and_search_prompts_have_the_contract_shape() -> None:
    assert format_prompt("rec", HISTORY[:2], None, 1) == \
        "[rec] History: <item_3> Heavy; <item_9> Black. Next item:"
    assert format_prompt("search", HISTORY[:1], "laser printer toner", 2) == \
        "[search] History: <item_3> Heavy Duty. Query: laser printer toner. Clicked item:"
    assert format_prompt("rec", [], None, 3) == "[rec] History: none. Next item:"
    assert format_prompt("rec", HISTORY[:1], "ignored for rec", 0) == "[rec] History: <item_3>. Next item:"


def test_titles_truncate_to_words_and_tolerate_spacing() -> None:
    assert history_entry("7", "  Wireless   Mouse\tErgonomic  ", 2) == "<item_7> Wireless Mouse"
    assert history_entry("7", "", 4) == "<item_7>"
    assert history_entry("7", None, 4) == "<item_7>"


def test_bad_task_or_missing_query_fail_clearly() -> None:
    with pytest.raises(ValueError, match="task"):
        format_prompt("browse", [], None, 3)
    with pytest.raises(ValueError, match="query"):
        format_prompt("search", HISTORY, "  ", 3)


@pytest.fixture
def tokenizer(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    extra = [(str(i), f"Item {i}") for i in range(100, 130)]
    add_item_tokens(model, tok, [*HISTORY, ("42", "Desk Lamp"), *extra])
    return tok


def _decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def test_encode_uses_the_chat_template(tokenizer) -> None:
    assert tokenizer.chat_template
    prompt = format_prompt("rec", HISTORY, None, 3)
    ids = encode_prompt(tokenizer, prompt, 512)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(item_token("9"))) == 1  # item tokens are atomic


def test_plain_tokenizer_without_template_gets_bos_and_text(tokenizer) -> None:
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    prompt = format_prompt("search", HISTORY, "toner", 3)
    ids = encode_prompt(plain, prompt, 512)
    assert ids[0] == plain.bos_token_id
    assert _decode(plain, ids[1:]) == prompt


@pytest.mark.parametrize("task,query,cue", [("rec", None, "Next item:"),
                                            ("search", "laser toner", "Query: laser toner. Clicked item:")])
def test_truncation_drops_the_oldest_history_first(tokenizer, task, query, cue) -> None:
    history = [(str(i), f"Item {i} with a long descriptive title") for i in range(100, 130)]
    prompt = format_prompt(task, history, query, 6)
    full = encode_prompt(tokenizer, prompt, 10_000)
    for max_len in (40, 80, len(full) - 1):
        ids = encode_prompt(tokenizer, prompt, max_len)
        text = _decode(tokenizer, ids)
        assert len(ids) <= max_len
        assert f"[{task}] History: " in text and cue in text and text.rstrip().endswith("assistant")
        kept = [i for i, _ in history if item_token(i) in text]
        if kept:  # a suffix of the history: the most recent entries survive
            assert kept == [i for i, _ in history][-len(kept):]
            one_more = format_prompt(task, history[-len(kept) - 1:], query, 6)
            assert len(encode_prompt(tokenizer, one_more, 10_000)) > max_len  # and as many as fit


def test_a_query_too_long_for_any_history_keeps_the_tail(tokenizer) -> None:
    prompt = format_prompt("search", HISTORY, "toner " * 200, 3)
    ids = encode_prompt(tokenizer, prompt, 30)
    assert len(ids) == 30
    assert "Clicked item:" in _decode(tokenizer, ids)


def test_training_example_labels_only_the_target(tokenizer) -> None:
    prompt = format_prompt("rec", HISTORY, None, 3)
    input_ids, labels = encode_training_example(tokenizer, prompt, "42", 64)
    target = tokenizer.convert_tokens_to_ids(item_token("42"))
    assert input_ids[-1] == target and labels[-1] == target
    assert labels[:-1] == [IGNORE_INDEX] * (len(input_ids) - 1)
    assert target not in input_ids[:-1]
    assert input_ids[:-1] == encode_prompt(tokenizer, prompt, 63)
    short, _ = encode_training_example(tokenizer, prompt, "42", 20)
    assert len(short) <= 20 and short[-1] == target


def test_unknown_item_token_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(KeyError, match="add_item_tokens"):
        encode_training_example(tokenizer, "[rec] History: none. Next item:", "no-such-item", 32)
