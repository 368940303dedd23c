"""Prefix trie over the catalog's code token sequences, held as flat tensors per depth.

Both ways of ranking under semantic ids walk it: full-catalog scoring runs one model position per
distinct prefix (an internal node) instead of one per item and code position, and constrained beam
search asks it which tokens may follow a prefix, so it can only ever produce real items. Nodes at
depth t are numbered 0..n_t-1; the children of a node are a contiguous, token-sorted run of the
next depth, so lookups are a slice and a binary search, with no per-node Python objects (a
million-item catalog is a few tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class CodeTrie:
    """The codes of ``item_ids`` (one row of token ids each, all of one length) as a prefix trie."""

    def __init__(self, item_ids: Sequence[str], codes: torch.Tensor) -> None:
        codes = torch.as_tensor(codes)
        if codes.dim() != 2 or codes.shape[1] < 1:
            raise ValueError(f"codes must be [n_items, code_length >= 1], got shape {tuple(codes.shape)}")
        if codes.shape[0] == 0:
            raise ValueError("the catalog is empty: no codes to build a trie from")
        if len(item_ids) != codes.shape[0]:
            raise ValueError(f"{len(item_ids)} item ids but {codes.shape[0]} codes")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool or int(codes.min()) < 0:
            raise ValueError("codes must be non-negative integer token ids")
        self.item_ids = tuple(str(i) for i in item_ids)
        self.codes = codes.long()
        #: per depth t = 1..L: for each node, its parent at depth t-1 and the token on the edge into it
        self.parents: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        #: per depth t = 0..L-1: where each node's children start at depth t+1, and how many there are
        self.child_starts: list[torch.Tensor] = []
        self.child_counts: list[torch.Tensor] = []
        paths = []
        node = torch.zeros(self.codes.shape[0], dtype=torch.long)
        for depth in range(self.code_length):
            edges, node = torch.unique(torch.stack([node, self.codes[:, depth]], dim=1), dim=0,
                                       return_inverse=True)
            counts = torch.bincount(edges[:, 0], minlength=self.nodes_at(depth))
            self.parents.append(edges[:, 0].contiguous())
            self.tokens.append(edges[:, 1].contiguous())
            self.child_counts.append(counts)
            self.child_starts.append(torch.cumsum(counts, 0) - counts)
            paths.append(node)
        #: [n_items, L]: the node each item passes at depth t+1
        self.item_paths = torch.stack(paths, dim=1)
        leaves = self.item_paths[:, -1]
        if self.nodes_at(self.code_length) != self.codes.shape[0]:
            shared = torch.bincount(leaves)
            first = int((shared > 1).nonzero()[0])
            clash = [self.item_ids[i] for i in (leaves == first).nonzero().flatten()[:5].tolist()]
            raise ValueError(f"codes are not unique: items {clash} share one code; every code must "
                             "decode to one item (see gems.semantic_ids)")
        #: item index of each leaf (node at depth L)
        self.leaf_items = torch.empty_like(leaves)
        self.leaf_items[leaves] = torch.arange(leaves.numel())

    @property
    def code_length(self) -> int:
        return int(self.codes.shape[1])

    def nodes_at(self, depth: int) -> int:
        """How many distinct prefixes of length ``depth`` there are (1 at the root)."""
        return 1 if depth == 0 else int(self.parents[depth - 1].numel())

    def children(self, depth: int, node: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, child nodes at depth+1) that may follow ``node`` at ``depth``, by token."""
        start = int(self.child_starts[depth][node])
        stop = start + int(self.child_counts[depth][node])
        return self.tokens[depth][start:stop], torch.arange(start, stop)

    def node_of(self, prefix: Sequence[int]) -> int | None:
        """The node a token prefix leads to (its depth is ``len(prefix)``), or None if no code has it."""
        if len(prefix) > self.code_length:
            return None
        node = 0
        for depth, token in enumerate(prefix):
            tokens, nodes = self.children(depth, node)
            at = int(torch.searchsorted(tokens, torch.tensor(int(token))))
            if at == tokens.numel() or int(tokens[at]) != int(token):
                return None
            node = int(nodes[at])
        return node

    def allowed_next(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that continue ``prefix`` towards some item ([] for a full code or a dead end)."""
        node = self.node_of(prefix)
        if node is None or len(prefix) == self.code_length:
            return []
        return self.children(len(prefix), node)[0].tolist()

    def item_of(self, code: Sequence[int]) -> int | None:
        """Catalog index of the item whose code is ``code``, or None."""
        if len(code) != self.code_length:
            return None
        node = self.node_of(code)
        return None if node is None else int(self.leaf_items[node])
