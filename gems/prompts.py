"""Task-tagged prompts (DESIGN.md section 4) and their tokenization.

rec:    ``[rec] History: <item_3> Stapler; <item_9> Toner. Next item:``
search: ``[search] History: <item_3> Stapler. Query: laser printer toner. Clicked item:``

The preprocessing stage builds the same strings vectorised (gems.data.sequences) from the pieces
defined here, and a test checks both agree on every example. Truncation drops the *oldest* history
entries, so the task tag, the query and the answer cue ("Next item:" / "Clicked item:") survive
any ``max_len``: a model that never sees the cue cannot be scored at the right position.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Sequence
from typing import Any

from gems.items import ITEM_TOKEN_PREFIX, item_token
from gems.tasks import TASKS

HISTORY_SEP = "; "
EMPTY_HISTORY = "none"
REC_CUE = "Next item:"
SEARCH_CUE = "Clicked item:"
#: The label of a position without loss (what torch's cross-entropy and HF's causal LM loss skip);
#: defined here, where labels are made, and imported by the batching, step and loss modules.
IGNORE_INDEX = -100

PROMPT_PARTS = re.compile(
    r"^(?P<head>\[(?:rec|search)\] History: )(?P<body>.*?)"
    r"(?P<tail>\. (?:" + re.escape(REC_CUE) + r"|Query: .*\. " + re.escape(SEARCH_CUE) + r"))$",
    re.DOTALL,
)
ENTRY_SPLIT = re.compile(re.escape(HISTORY_SEP) + r"(?=" + re.escape(ITEM_TOKEN_PREFIX) + r")")


def short_title(title: str | None, title_max_words: int) -> str:
    """The first ``title_max_words`` whitespace-separated words of a title."""
    if not title or title_max_words <= 0:
        return ""
    return " ".join(title.split()[:title_max_words])


def history_entry(item_id: str, title: str | None, title_max_words: int) -> str:
    """``<item_ID> First title words`` (just the token when the title is empty or hidden)."""
    words = short_title(title, title_max_words)
    return f"{item_token(item_id)} {words}" if words else item_token(item_id)


def prompt_head(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be 'search' or 'rec', got {task!r}")
    return f"[{task}] History: "


def prompt_tail(task: str, query: str | None) -> str:
    if task == "rec":
        return f". {REC_CUE}"
    if query is None or not query.strip():
        raise ValueError("a search prompt needs a non-empty query")
    return f". Query: {query.strip()}. {SEARCH_CUE}"


def _assemble(head: str, entries: Sequence[str], tail: str) -> str:
    return head + (HISTORY_SEP.join(entries) if entries else EMPTY_HISTORY) + tail


def format_prompt(task: str, history: Sequence[tuple[str, str]], query: str | None,
                  title_max_words: int) -> str:
    """The prompt for one example; ``history`` is (item_id, title) pairs, oldest first.

    A rec prompt never shows a query (the query of a rec event is not the user's input).
    """
    entries = [history_entry(item_id, title, title_max_words) for item_id, title in history]
    return _assemble(prompt_head(task), entries, prompt_tail(task, query))


_SENTINEL = "\x00GEMS_PROMPT\x00"


def user_turn_template(tokenizer: Any) -> tuple[str, str] | None:
    """(prefix, suffix) of a user turn in the backbone's chat template, without the system prompt
    the template injects by default; None when the tokenizer has no chat template.

    Templates such as SmolLM2's and Qwen2.5's add a default system prompt when the conversation has
    none (30 identical tokens per SmolLM2 prompt). The user turn is isolated by rendering it after
    an explicit empty system turn and removing that empty turn's own rendering; a template that
    injects nothing renders the same either way. Computed once per tokenizer and template.
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    cache = getattr(tokenizer, "_gems_user_turn", None)
    if cache is not None and cache[0] == template:
        return cache[1]

    def render(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    user = [{"role": "user", "content": _SENTINEL}]
    plain = render(user, True)
    turn = plain
    try:
        with_system = render([{"role": "system", "content": ""}, *user], True)
        empty_system = render([{"role": "system", "content": ""}], False)
    except Exception:  # noqa: BLE001 - templates that reject a system turn inject none either
        with_system = empty_system = ""
    if empty_system and with_system.startswith(empty_system):
        candidate = with_system[len(empty_system):]
        if plain.endswith(candidate) and _SENTINEL in candidate:
            turn = candidate
    prefix, _, suffix = turn.partition(_SENTINEL)
    with contextlib.suppress(AttributeError):  # a tokenizer that refuses new attributes: recompute
        tokenizer._gems_user_turn = (template, (prefix, suffix))
    return prefix, suffix


def _render(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` as the backbone expects a user turn: inside its chat template when it
    has one (user turn + generation prompt, no injected system prompt), else plain text after BOS."""
    turn = user_turn_template(tokenizer)
    if turn is not None:
        return list(tokenizer(turn[0] + text + turn[1], add_special_tokens=False)["input_ids"])
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos, *ids] if bos is not None else ids


def encode_prompt(tokenizer: Any, prompt: str, max_len: int) -> list[int]:
    """Token ids of ``prompt`` (at most ``max_len``), dropping the oldest history entries first.

    Only when even an empty history does not fit (a huge query) are raw tokens cut from the left.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = _render(tokenizer, prompt)
    if len(ids) <= max_len:
        return ids
    parts = PROMPT_PARTS.match(prompt)
    if parts is None:
        return ids[-max_len:]
    body = parts["body"]
    entries = [] if body == EMPTY_HISTORY else ENTRY_SPLIT.split(body)
    lo, hi = 0, len(entries) - 1  # most recent entries kept: find the largest count that fits
    best = _render(tokenizer, _assemble(parts["head"], [], parts["tail"]))
    if len(best) > max_len:
        return best[-max_len:]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = _render(tokenizer, _assemble(parts["head"], entries[len(entries) - mid:], parts["tail"]))
        if len(candidate) <= max_len:
            lo, best = mid, candidate
        else:
            hi = mid - 1
    return best


def item_token_id(tokenizer: Any, item_id: str) -> int:
    """The id of ``<item_ID>``; a clear error when the item tokens were not added yet."""
    token = item_token(item_id)
    token_id = tokenizer.convert_tokens_to_ids(token)
    unk = getattr(tokenizer, "unk_token_id", None)
    if token_id is None or (unk is not None and token_id == unk and token != tokenizer.unk_token):
        raise KeyError(f"{token} is not in the tokenizer vocabulary; add the catalog's item tokens "
                       "first (gems.model.add_item_tokens)")
    return int(token_id)


def encode_training_example(tokenizer: Any, prompt: str, target_item_id: str, max_len: int,
                            history_item_tokens: Collection[int] | None = None
                            ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for teacher forcing: the prompt (truncated to ``max_len - 1``) followed
    by the target item token; labels are -100 except at the target position (HF shifts them).

    ``history_item_tokens`` (the catalog's item token ids): also label every history item token
    of the prompt but its first, so each is predicted from the items before it (history targets,
    :mod:`gems.target_loss`). The first has no item before it: predicting it would teach popularity.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2 (prompt + target), got {max_len}")
    target = item_token_id(tokenizer, target_item_id)
    prompt_ids = encode_prompt(tokenizer, prompt, max_len - 1)
    labels = [IGNORE_INDEX] * len(prompt_ids)
    if history_item_tokens:
        positions = [i for i, token in enumerate(prompt_ids) if token in history_item_tokens]
        for i in positions[1:]:
            labels[i] = prompt_ids[i]
    return [*prompt_ids, target], [*labels, target]
