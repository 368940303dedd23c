"""Which item identifiers a catalog gets: one atomic token per item, or semantic codes.

Atomic tokens are exact and cheap to rank (one forward pass scores the whole catalog), but every
item is a new row in the embedding and, when untied, in the LM head: 1.9M Qilin notes on a 3B
backbone of width 2048 add ~3.9B parameters before training starts. Semantic codes add L*K rows
(plus a few disambiguation rows) whatever the catalog size, at the price of L decoding steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gems.residual_kmeans import check_codebook_shape

IdScheme = Literal["atomic", "semantic"]
ID_SCHEME_SETTINGS: tuple[str, ...] = ("auto", "atomic", "semantic")

#: Largest catalog that stays atomic under ``auto``: 100k rows at SmolLM2's width 576 are 58M
#: parameters (43% of the 135M backbone), the point where item rows start to dominate the model.
ATOMIC_MAX_ITEMS = 100_000


@dataclass(frozen=True)
class IdSchemeChoice:
    """The scheme a catalog gets and the sentence that says why (for logs and run params)."""

    scheme: IdScheme
    reason: str


def choose_id_scheme(n_items: int, setting: str = "auto", *, atomic_max_items: int = ATOMIC_MAX_ITEMS,
                     levels: int = 3, codebook_size: int = 256) -> IdSchemeChoice:
    """``setting`` atomic|semantic is kept as set; ``auto`` is atomic up to ``atomic_max_items``.

    Under ``auto`` a catalog above the threshold still stays atomic when the codebooks alone
    (L*K rows) would add as many rows as one token per item.
    """
    if setting not in ID_SCHEME_SETTINGS:
        raise ValueError(f"items.id_scheme must be one of {ID_SCHEME_SETTINGS}, got {setting!r}")
    if n_items < 1:
        raise ValueError(f"the catalog is empty (n_items={n_items}); no id scheme to choose")
    if atomic_max_items < 1:
        raise ValueError(f"atomic_max_items must be >= 1, got {atomic_max_items}")
    check_codebook_shape(levels, codebook_size)
    code_rows = levels * codebook_size
    if setting != "auto":
        chosen: IdScheme = "atomic" if setting == "atomic" else "semantic"
        return IdSchemeChoice(chosen, f"items.id_scheme={setting} is set explicitly ({n_items} items)")
    if n_items <= atomic_max_items:
        return IdSchemeChoice("atomic", f"{n_items} items <= atomic_max_items={atomic_max_items}: "
                              f"one token per item adds {n_items} rows and ranks the catalog in one pass")
    if code_rows >= n_items:
        return IdSchemeChoice("atomic", f"{n_items} items > atomic_max_items={atomic_max_items}, but "
                              f"L*K={levels}*{codebook_size}={code_rows} code rows would not be fewer "
                              f"than {n_items} item rows")
    return IdSchemeChoice("semantic", f"{n_items} items > atomic_max_items={atomic_max_items}: codes of "
                          f"L={levels} tokens from K={codebook_size} per level add {code_rows} rows "
                          f"(plus disambiguation rows) instead of {n_items}")
