"""Full-catalog scores under semantic ids: the log-probability of each item's whole code.

An item's score is sum_t log p(code_t | prompt, code_<t), teacher-forced, over the full vocabulary
(what the LM assigns to that exact token sequence, and what beam search adds up, so both rankings
agree). Items sharing a prefix share its positions: the prompt and every internal trie node (a
distinct code prefix) go through the model in ONE forward pass, each node token attending to the
prompt and to its own ancestors only (a tree attention mask), so a prefix is computed once however
many items continue it. Scores come out as [n_prompts, n_items] in catalog order, the shape
:mod:`gems.metrics` and :func:`gems.evaluate.evaluate_scorer` rank. Cost per prompt grows with the
number of internal nodes (about the catalog size for deep codes): exact on small catalogs; large
ones rank with :mod:`gems.code_beam_search`.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from gems.code_trie import CodeTrie
from gems.scoring import left_pad


def score_codes(model: PreTrainedModel, encoded_prompts: list[list[int]], trie: CodeTrie,
                pad_token_id: int, batch_size: int = 2) -> torch.Tensor:
    """Scores [n_prompts, n_items] (fp32, CPU): summed code-token log-probabilities per item.

    A prompt scores the same alone or in any batch (position ids skip the left padding). The
    attention mask is additive, which eager and sdpa attention accept; the model's train/eval
    mode is restored afterwards. Memory: the logits of ``batch_size`` x (internal nodes + 1)
    positions over the vocabulary (SmolLM2, 2.4k nodes: ~0.5 GB per prompt).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    empty = [i for i, p in enumerate(encoded_prompts) if len(p) == 0]
    if empty:
        raise ValueError(f"encoded prompts {empty[:5]} are empty; every prompt needs >= 1 token")
    scores = torch.empty(len(encoded_prompts), len(trie.item_ids), dtype=torch.float32)
    device = next(model.parameters()).device
    nodes = _InternalNodes(trie)
    order = sorted(range(len(encoded_prompts)), key=lambda i: len(encoded_prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start:start + batch_size]
                scores[rows] = _score_batch(model, [encoded_prompts[i] for i in rows], trie, nodes,
                                            pad_token_id, device)
    finally:
        model.train(was_training)
    return scores


class _InternalNodes:
    """Trie nodes at depths 1..L-1 laid out depth by depth after the prompt, with their ancestry."""

    def __init__(self, trie: CodeTrie) -> None:
        depths = range(1, trie.code_length)
        sizes = [trie.nodes_at(d) for d in depths]
        #: where each depth's block starts among the internal nodes
        self.offsets = {depth: sum(sizes[:i]) for i, depth in enumerate(depths)}
        self.count = sum(sizes)
        none = torch.empty(0, dtype=torch.long)
        self.tokens = torch.cat([none, *(trie.tokens[d - 1] for d in depths)])
        self.depth = torch.cat([none, *(torch.full((n,), d) for d, n in zip(depths, sizes, strict=True))])
        #: [count, count] True where a node may attend to another: its ancestors and itself
        self.sees = torch.zeros(self.count, self.count, dtype=torch.bool)
        ancestry = torch.empty(1, 0, dtype=torch.long)  # the root has no internal ancestors
        for depth in depths:
            own = self.offsets[depth] + torch.arange(trie.nodes_at(depth))
            ancestry = torch.cat([ancestry[trie.parents[depth - 1]], own.unsqueeze(1)], dim=1)
            self.sees[own.unsqueeze(1).expand_as(ancestry), ancestry] = True


def _score_batch(model: PreTrainedModel, prompts: list[list[int]], trie: CodeTrie, nodes: _InternalNodes,
                 pad_token_id: int, device: torch.device) -> torch.Tensor:
    prompt_ids, prompt_mask = left_pad(prompts, pad_token_id)
    batch = prompt_ids.shape[0]
    input_ids = torch.cat([prompt_ids, nodes.tokens.expand(batch, -1)], dim=1)
    lengths = prompt_mask.sum(dim=1, keepdim=True)
    positions = torch.cat([(prompt_mask.cumsum(-1) - 1).clamp(min=0), lengths + nodes.depth - 1], dim=1)
    dtype = next(model.parameters()).dtype
    mask = _tree_mask(prompt_mask.bool(), nodes.sees).to(device)
    additive = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids.to(device), attention_mask=additive.unsqueeze(1),
                   position_ids=positions.to(device), use_cache=False,
                   logits_to_keep=nodes.count + 1).logits
    logits = logits.float()  # [batch, 1 + internal nodes, vocab]: the prompt end, then each node
    normaliser = torch.logsumexp(logits, dim=-1)  # log-probs only where needed, no second full copy
    scores = torch.zeros(batch, len(trie.item_ids), dtype=torch.float32)
    for depth in range(1, trie.code_length + 1):
        # The logits that predict a depth-`depth` node sit at its parent: the prompt end for the root.
        parents = trie.parents[depth - 1].to(logits.device)
        at = torch.zeros_like(parents) if depth == 1 else 1 + nodes.offsets[depth - 1] + parents
        edge = logits[:, at, trie.tokens[depth - 1].to(logits.device)] - normaliser[:, at]
        scores += edge.cpu()[:, trie.item_paths[:, depth - 1]]  # [batch, nodes at depth] -> items
    return scores


def _tree_mask(prompt_keys: torch.Tensor, node_sees: torch.Tensor) -> torch.Tensor:
    """[batch, W, W] bool: prompt tokens attend causally to real prompt tokens, node tokens to
    the whole real prompt and their ancestors; every position sees itself (so padding never
    meets a row with nothing to attend to)."""
    batch, width = prompt_keys.shape
    count = node_sees.shape[0]
    total = width + count
    mask = torch.zeros(batch, total, total, dtype=torch.bool)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask[:, :width, :width] = causal & prompt_keys.unsqueeze(1)
    mask[:, width:, :width] = prompt_keys.unsqueeze(1)
    mask[:, width:, width:] = node_sees
    mask |= torch.eye(total, dtype=torch.bool)
    return mask
