"""History targets (``train.history_targets``): history item tokens as extra targets, weighted so an
example's answer stays its main signal, and nothing changes when they are off."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from gems.config import GEMSConfig, TrainConfig
from gems.methods import build_method
from gems.model import add_item_tokens
from gems.prompts import IGNORE_INDEX, encode_training_example, format_prompt
from gems.step import TaskBatch, task_ce_sum
from gems.target_loss import TargetLoss, target_weights

torch.set_num_threads(1)
X = IGNORE_INDEX


def test_weights_by_hand() -> None:
    labels = torch.tensor([[X, 5, X, 6, 7],
                           [X, X, X, X, 8],
                           [X, X, X, X, X]])
    got = target_weights(labels, 0.5)
    expected = torch.tensor([[0, 0.25, 0, 0.25, 1],
                             [0, 0, 0, 0, 1],
                             [0, 0, 0, 0, 0]])
    torch.testing.assert_close(got, expected)
    # off: history targets weigh nothing, the answers 1
    torch.testing.assert_close(target_weights(labels, 0.0), (labels == 7).float() + (labels == 8).float())


@pytest.mark.parametrize("mode", ["catalog", "vocab"])
def test_weighted_ce_is_the_weighted_sum_of_per_position_ce(mode: str) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 12, generator=gen)
    items = torch.tensor([3, 5, 7, 9, 11])
    targets = torch.tensor([5, X, 9, 11])
    weights = torch.tensor([0.3, 0.7, 0.5, 1.0])
    loss = TargetLoss.build(mode, items)
    columns = items if mode == "catalog" else torch.arange(12)
    expected = sum(float(w) * float(F.cross_entropy(logits[i, columns][None], (columns == t).nonzero()[0]))
                   for i, (t, w) in enumerate(zip(targets.tolist(), weights, strict=True)) if t != X)
    torch.testing.assert_close(loss.ce_sum(logits, targets, weights), torch.tensor(expected))
    torch.testing.assert_close(loss.ce_sum(logits, targets, torch.ones(4)), loss.ce_sum(logits, targets))


def test_negative_history_weight_is_refused() -> None:
    with pytest.raises(ValueError, match="history_targets"):
        TargetLoss.build("vocab", None, -1.0)
    with pytest.raises(ValueError):
        TrainConfig(history_targets=-0.5)


HISTORY = [("3", "Heavy Duty Stapler"), ("9", "Black Laser Toner"), ("4", "Blue Pen")]


@pytest.fixture
def items_model(tiny_model_and_tokenizer):
    model, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(model, tok, [*HISTORY, ("42", "Desk Lamp"), ("7", "Paper Clips")])
    return model, tok, [int(i) for i in ids]


@pytest.mark.parametrize("title_words", [0, 2])
@pytest.mark.parametrize("task,query", [("rec", None), ("search", "blue pen")])
def test_encoding_labels_every_history_item_but_the_first(items_model, title_words, task, query) -> None:
    _, tok, ids = items_model
    prompt = format_prompt(task, HISTORY, query, title_words)
    plain_ids, plain_labels = encode_training_example(tok, prompt, "42", 256)
    input_ids, labels = encode_training_example(tok, prompt, "42", 256, frozenset(ids))
    assert input_ids == plain_ids  # the prompt itself is unchanged
    history = [tok.convert_tokens_to_ids(f"<item_{i}>") for i, _ in HISTORY]
    labelled = [(i, t) for i, t in enumerate(labels) if t != X]
    assert [t for _, t in labelled] == [*history[1:], ids[3]]  # items 9, 4, then the answer 42
    assert all(input_ids[i] == t for i, t in labelled)  # a label is the token at its own position
    assert plain_labels == [X] * (len(plain_ids) - 1) + [ids[3]]
    # truncation keeps the newest entries: the first item kept is the one not labelled
    short_ids, short_labels = encode_training_example(tok, prompt, "42", len(plain_ids) - 2, frozenset(ids))
    kept = [t for t in short_ids[:-1] if t in set(ids)]
    assert len(kept) < 3 and [t for t in short_labels if t != X] == [*kept[1:], ids[3]]


def _batch(tok, ids, history_tokens) -> TaskBatch:
    rows = [encode_training_example(tok, format_prompt("rec", HISTORY[: n + 1], None, 0), "42", 64,
                                    history_tokens) for n in range(3)]
    width = max(len(r[0]) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r[0])) + r[0] for r in rows])
    mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in rows])
    labels = torch.tensor([[X] * (width - len(r[1])) + r[1] for r in rows])
    return TaskBatch(input_ids, mask, labels)


def test_history_targets_weigh_what_the_formula_says_and_zero_is_the_plain_loss(items_model) -> None:
    model, tok, ids = items_model
    plain = _batch(tok, ids, None)
    dense = _batch(tok, ids, frozenset(ids))
    assert int((dense.labels != X).sum()) == 3 + 0 + 1 + 2  # answers + 0, 1, 2 history targets
    with torch.no_grad():
        off = task_ce_sum(model, dense, loss=TargetLoss.build("catalog", ids, 0.0))
        base = task_ce_sum(model, plain, loss=TargetLoss.build("catalog", ids, 0.0))
        torch.testing.assert_close(off, base)  # weight 0: the history labels change nothing
        on = task_ce_sum(model, dense, loss=TargetLoss.build("catalog", ids, 1.0))
        # by hand: per position CE over the catalog, each row's history targets sharing weight 1
        logits = model(input_ids=dense.input_ids, attention_mask=dense.attention_mask,
                       position_ids=(dense.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, :-1]
        shifted = dense.labels[:, 1:]
        expected = 0.0
        for r in range(3):
            positions = (shifted[r] != X).nonzero().squeeze(-1).tolist()
            for p in positions:
                catalog = logits[r, p, ids]
                ce = -(catalog[ids.index(int(shifted[r, p]))] - torch.logsumexp(catalog, 0))
                weight = 1.0 if p == positions[-1] else 1.0 / (len(positions) - 1)
                expected += weight * float(ce)
    torch.testing.assert_close(on, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_a_step_with_history_targets_normalises_by_weight_and_counts_examples(items_model) -> None:
    model, tok, ids = items_model
    dense = _batch(tok, ids, frozenset(ids))
    batches = {"search": [dense], "rec": [copy.deepcopy(dense)]}
    method = build_method(copy.deepcopy(model), GEMSConfig(method="adamw"), 1e-3, item_token_ids=ids,
                          loss="catalog", history_weight=0.5)
    with torch.no_grad():
        ce = float(task_ce_sum(method.model, dense, loss=method.target_loss))
    stats = method.train_step(batches, max_grad_norm=None, measure_conflict=False)
    assert stats.samples == {"search": 3, "rec": 3}  # examples, not target tokens
    # rows with history targets weigh 1.5, the row without weighs 1
    assert stats.loss["rec"] == pytest.approx(ce / (1.5 + 1.5 + 1.0), rel=1e-5)


class _Recorder:
    """A StepMethod that keeps ``.grad`` after each task's passes (what GEMS reads there)."""

    def __init__(self, model, loss: TargetLoss) -> None:
        self.model, self.target_loss, self.seen = model, loss, {}

    def begin_step(self) -> None:
        self.model.zero_grad(set_to_none=True)

    def after_task_backward(self, task: str, measure_conflict: bool) -> None:
        self.seen[task] = self.model.get_input_embeddings().weight.grad.clone()

    def finish_step(self, losses, samples, max_grad_norm):
        from gems.step import StepStats
        return StepStats(loss=losses, samples=samples, grad_norm=0.0)


def test_history_targets_in_one_task_leave_the_task_shares_as_they_were(items_model) -> None:
    from gems.step import train_step

    model, tok, ids = items_model
    search, dense_rec = _batch(tok, ids, None), _batch(tok, ids, frozenset(ids))
    loss = TargetLoss.build("catalog", ids, 4.0)

    def grad_of(batch: TaskBatch) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        (task_ce_sum(model, batch, loss=loss) / float(loss.weights(batch.labels[:, 1:]).sum())).backward()
        return model.get_input_embeddings().weight.grad.clone()

    g_search, g_rec = grad_of(search), grad_of(dense_rec)
    recorder = _Recorder(model, loss)
    stats = train_step(model, recorder, {"search": [search], "rec": [dense_rec]})
    # 3 examples per task: each task weighs 1/2 however many targets its examples carry
    torch.testing.assert_close(recorder.seen["search"], 0.5 * g_search, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(recorder.seen["rec"], 0.5 * g_search + 0.5 * g_rec, rtol=1e-4, atol=1e-7)
    assert stats.samples == {"search": 3, "rec": 3}


def test_history_target_tasks_are_validated() -> None:
    assert TrainConfig(history_target_tasks=["rec"]).history_target_tasks == ["rec"]
    with pytest.raises(ValueError):
        TrainConfig(history_target_tasks=["browse"])
