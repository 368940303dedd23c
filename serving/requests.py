"""What a ranking request must hold, checked before any prompt is built or scored.

A served model answers strangers: a bad row must come back as one sentence naming the row and the
field, never as a stack trace with the server's paths, and never as a silent default (``top_k: 0``
used to return 10 items). The pyfunc turns :class:`RequestError` into MLflow's
INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400 and the message only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection
from typing import Any

import pandas as pd

from gems.tasks import TASKS

REQUIRED_COLUMNS = ("task", "history_item_ids")
INPUT_COLUMNS = (*REQUIRED_COLUMNS, "query")


class RequestError(ValueError):
    """A request the model cannot rank; the message names the row and what is wrong with it."""


def is_missing(value: Any) -> bool:
    """None or a NaN (pandas' spelling of a missing cell)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def history_ids(value: Any) -> list[str]:
    """A history cell as item ids (a missing cell is an empty history)."""
    if is_missing(value):
        return []
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        raise RequestError(f"history_item_ids must be a list of item ids, got {value!r}")
    return [str(v) for v in value]


def check_requests(requests: pd.DataFrame, catalog: Collection[str]) -> None:
    """Raise RequestError for the first row the model cannot rank (task, history, query)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in requests.columns]
    if missing:
        raise RequestError(f"requests lack columns {missing}; expected {list(INPUT_COLUMNS)}")
    queries = requests["query"] if "query" in requests.columns else [None] * len(requests)
    for row, (task, history, query) in enumerate(zip(requests["task"], requests["history_item_ids"], queries,
                                                     strict=True)):
        if task not in TASKS:
            raise RequestError(f"row {row}: task must be 'search' or 'rec', got {task!r}")
        try:
            unknown = [i for i in history_ids(history) if i not in catalog]
        except RequestError as err:
            raise RequestError(f"row {row}: {err}") from None
        if unknown:
            raise RequestError(f"row {row}: history items not in the catalog: {unknown[:5]}")
        if task == "search" and (is_missing(query) or not str(query).strip()):
            raise RequestError(f"row {row}: a search request needs a non-empty query")


def check_top_k(value: Any, catalog_size: int) -> int:
    """``top_k`` as an int within 1..catalog size (a bool or a fraction is not a count)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        raise RequestError(f"top_k must be a whole number from 1 to {catalog_size}, got {value!r}")
    if not 1 <= int(value) <= catalog_size:
        raise RequestError(f"top_k must be from 1 to {catalog_size} (the catalog size), got {int(value)}")
    return int(value)
