"""Item identity inside the LLM: one atomic token per catalog item."""

from __future__ import annotations

ITEM_TOKEN_PREFIX = "<item_"


def item_token(item_id: str) -> str:
    """The token that stands for ``item_id`` in prompts and as the generation target."""
    return f"{ITEM_TOKEN_PREFIX}{item_id}>"


def item_id_from_token(token: str) -> str:
    if not (token.startswith(ITEM_TOKEN_PREFIX) and token.endswith(">")):
        raise ValueError(f"not an item token: {token!r}")
    return token[len(ITEM_TOKEN_PREFIX):-1]
