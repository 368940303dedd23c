"""Mixed-task batches: both tasks in every step at the configured ratio, left padding, seeded
determinism, epoch coverage, rank slices, and a resumable position."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gems.batching import (
    IGNORE_INDEX,
    LazyEncoded,
    MixedTaskBatcher,
    TokenizedExample,
    task_counts,
)

PAD = 0


def _examples(task_offset: int, n: int) -> list[TokenizedExample]:
    # Example i of a task has length 2 + i % 4 and a unique target id, so batches can be decoded.
    out = []
    for i in range(n):
        ids = [5] * (1 + i % 4) + [task_offset + i]
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (len(ids) - 1) + [task_offset + i]))
    return out


DATA = {"search": _examples(1000, 7), "rec": _examples(2000, 11)}


def _batcher(**kw) -> MixedTaskBatcher:
    args = dict(batch_size=6, search_fraction=1 / 3, grad_accum=2, seed=0, pad_token_id=PAD)
    return MixedTaskBatcher(DATA, **{**args, **kw})


def _targets(batches) -> dict[str, list[int]]:
    return {task: [int(t) for mb in mbs for t in mb.labels[mb.labels != IGNORE_INDEX]]
            for task, mbs in batches.items()}


@given(st.integers(2, 512), st.floats(0.01, 0.99))
def test_task_counts_keep_both_tasks_near_the_ratio(batch_size: int, fraction: float) -> None:
    counts = task_counts(batch_size, fraction)
    assert counts["search"] >= 1 and counts["rec"] >= 1
    assert counts["search"] + counts["rec"] == batch_size
    if 1 <= batch_size * fraction <= batch_size - 1:
        assert abs(counts["search"] - batch_size * fraction) <= 0.5


def test_every_step_has_both_tasks_at_the_ratio_in_left_padded_micro_batches() -> None:
    b = _batcher()
    for step in range(5):
        batches = b.batches_at(step)
        assert [len(batches["search"]), len(batches["rec"])] == [2, 2]
        targets = _targets(batches)
        assert len(targets["search"]) == 2 and len(targets["rec"]) == 4
        assert all(1000 <= t < 1007 for t in targets["search"])
        assert all(2000 <= t < 2011 for t in targets["rec"])
        for mb in batches["search"] + batches["rec"]:
            assert mb.input_ids.shape == mb.attention_mask.shape == mb.labels.shape
            assert bool(mb.attention_mask[:, -1].all())  # left padding: prompts end together
            pad = mb.attention_mask == 0
            assert bool((mb.input_ids[pad] == PAD).all() and (mb.labels[pad] == IGNORE_INDEX).all())
            assert bool((mb.labels[:, -1] == mb.input_ids[:, -1]).all())  # target is the last token


def test_fewer_examples_than_micro_batches_gives_fewer_micro_batches() -> None:
    batches = _batcher(grad_accum=3).batches_at(0)
    assert len(batches["search"]) == 2 and len(batches["rec"]) == 3


def test_same_seed_same_batches_other_seed_other_order() -> None:
    a = [_targets(_batcher().batches_at(s)) for s in range(6)]
    assert a == [_targets(_batcher().batches_at(s)) for s in range(6)]
    assert a != [_targets(_batcher(seed=1).batches_at(s)) for s in range(6)]


def test_each_epoch_covers_every_example_once() -> None:
    b = _batcher(batch_size=2, search_fraction=0.5)  # one example per task per step
    seen = [b.indices_at(s)["rec"][0] for s in range(22)]
    assert sorted(seen[:11]) == sorted(seen[11:]) == list(range(11))
    assert seen[:11] != seen[11:]  # a fresh permutation per epoch


def test_ranks_take_disjoint_slices_of_the_global_batch() -> None:
    one = MixedTaskBatcher(DATA, batch_size=8, search_fraction=0.5, grad_accum=1, seed=3,
                           pad_token_id=PAD)
    ranks = [MixedTaskBatcher(DATA, batch_size=4, search_fraction=0.5, grad_accum=1, seed=3,
                              pad_token_id=PAD, rank=r, world_size=2) for r in range(2)]
    for step in range(4):
        together = one.indices_at(step)
        split = [r.indices_at(step) for r in ranks]
        for task in ("search", "rec"):
            assert split[0][task] + split[1][task] == together[task]


def test_resumed_batcher_sees_what_an_uninterrupted_one_would() -> None:
    run = _batcher()
    uninterrupted = [_targets(run.batches_at(s)) for s in range(8)]
    position = json.loads(json.dumps(run.position(5)))  # as stored in trainer_state.json
    assert position["rec"] == {"epoch": 1, "offset": 9, "num_examples": 11}  # 5 steps x 4 rec
    resumed = _batcher()
    start = resumed.resume_step(position)
    assert [_targets(resumed.batches_at(s)) for s in range(start, 8)] == uninterrupted[5:]


@pytest.mark.parametrize("change", [{"seed": 1}, {"batch_size": 8}, {"world_size": 2}])
def test_position_from_another_layout_is_refused(change: dict) -> None:
    position = _batcher().position(3)
    with pytest.raises(ValueError, match="exact resumption is impossible"):
        _batcher(**change).resume_step(position)


def test_missing_task_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"no train examples for task\(s\) \['search'\]"):
        MixedTaskBatcher({"search": [], "rec": DATA["rec"]}, batch_size=4, search_fraction=0.5,
                         grad_accum=1, seed=0, pad_token_id=PAD)


def test_lazy_encoding_tokenizes_only_what_is_used() -> None:
    calls: list[int] = []

    def encode(row: int) -> TokenizedExample:
        calls.append(row)
        return TokenizedExample([row + 1], [row + 1])

    lazy = LazyEncoded(list(range(100)), encode)
    b = MixedTaskBatcher({"search": lazy, "rec": DATA["rec"]}, batch_size=4, search_fraction=0.5,
                         grad_accum=1, seed=0, pad_token_id=PAD)
    b.batches_at(0), b.batches_at(0)
    assert len(calls) == 2 and len(set(calls)) == 2
    assert torch.equal(b.batches_at(0)["search"][0].labels.flatten().sort().values,
                       torch.tensor(sorted(c + 1 for c in calls)))
