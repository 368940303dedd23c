"""The parts that make training learn within a CPU budget: catalog loss, item-row learning rate,
lean prompts, length bucketing and subspaces that never learn float noise."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from optim_helpers import mixed_batches

from gems.batching import MixedTaskBatcher, TokenizedExample
from gems.config import GEMSConfig
from gems.item_rows import ItemRows
from gems.methods import build_method
from gems.model import add_item_tokens, load_backbone
from gems.optim import GEMSAdamW
from gems.prompts import encode_prompt, format_prompt
from gems.step import TaskBatch
from gems.subspace import top_basis
from gems.target_loss import TargetLoss

torch.set_num_threads(1)

# SmolLM2-135M-Instruct's chat template, verbatim: it injects a default system prompt.
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")


# ------------------------------------------------------------------------------ catalog loss


def test_catalog_loss_is_the_softmax_over_item_rows_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, generator=gen)
    items = torch.tensor([7, 2, 9, 4])
    targets = torch.tensor([9, -100, 2])
    got = TargetLoss.build("catalog", items).ce_sum(logits, targets)
    expected = 0.0
    for row, target in ((0, 9), (2, 2)):
        item_logits = logits[row, items]
        expected += -(item_logits[items.tolist().index(target)] - torch.logsumexp(item_logits, 0))
    torch.testing.assert_close(got, torch.as_tensor(expected, dtype=torch.float32))
    vocab = TargetLoss().ce_sum(logits, targets)
    torch.testing.assert_close(vocab, F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
    assert got < vocab  # fewer candidates than the vocabulary: a smaller normaliser


def test_catalog_loss_refuses_targets_outside_the_catalog_and_bad_ids() -> None:
    loss = TargetLoss.build("catalog", [1, 2])
    with pytest.raises(ValueError, match="not catalog item tokens"):
        loss.ce_sum(torch.zeros(1, 5), torch.tensor([3]))
    with pytest.raises(ValueError, match="twice"):
        TargetLoss.build("catalog", [1, 1])
    with pytest.raises(ValueError, match="needs the catalog"):
        TargetLoss.build("catalog", None)
    with pytest.raises(ValueError, match="train.loss"):
        TargetLoss.build("items", [1])


def test_catalog_loss_leaves_text_rows_of_an_untied_head_alone(tiny_cfg, tmp_path, tiny_items) -> None:
    cfg = tiny_cfg.model.model_copy(update={"tiny": tiny_cfg.model.tiny.model_copy(
        update={"tie_word_embeddings": False})})
    model, tok = load_backbone(cfg, tmp_path)
    ids = add_item_tokens(model, tok, tiny_items)
    method = build_method(model, GEMSConfig(method="adamw"), 1e-3, item_token_ids=ids, loss="catalog")
    batch = _item_batch(tok, ids, seed=1)
    model.zero_grad()
    from gems.step import task_ce_sum

    task_ce_sum(model, batch, loss=method.target_loss).backward()
    head_grad = model.get_output_embeddings().weight.grad
    text = torch.ones(head_grad.shape[0], dtype=torch.bool)
    text[torch.tensor(ids)] = False
    assert float(head_grad[text].abs().max()) == 0.0  # no text token is pushed down
    assert float(head_grad[torch.tensor(ids)].abs().max()) > 0.0


def _item_batch(tok, item_ids: list[int], seed: int, rows: int = 4, width: int = 9) -> TaskBatch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 200, (rows, width), generator=gen)
    targets = torch.tensor(item_ids)[torch.randint(0, len(item_ids), (rows,), generator=gen)]
    ids[:, -1] = targets
    labels = torch.full_like(ids, -100)
    labels[:, -1] = targets
    return TaskBatch(ids, torch.ones_like(ids), labels)


# ---------------------------------------------------------------------------- item-row lr


@pytest.mark.parametrize("method", ["adamw", "gems", "lora"])
def test_item_learning_rate_scales_only_item_rows(tiny_model_and_tokenizer, tiny_items, method: str) -> None:
    base, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(base, tok, tiny_items)
    cfg = GEMSConfig(method=method, r_shared=4, t_svd=5, k=0)
    deltas = {}
    for scale in (1.0, 3.0):
        model = copy.deepcopy(base)
        torch.manual_seed(0)  # LoRA's A matrices start random: the same start for both scales
        built = build_method(model, cfg, 1e-3, item_token_ids=ids, loss="catalog", item_lr_scale=scale)
        before = {n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad}
        batches = {"search": [_item_batch(tok, ids, 1)], "rec": [_item_batch(tok, ids, 2)]}
        built.train_step(batches, max_grad_norm=None)
        deltas[scale] = {n: p.detach() - before[n] for n, p in built.model.named_parameters() if n in before}
    item_names = [n for n in deltas[1.0] if "trainable_tokens_delta" in n or "embed_tokens.weight" in n]
    assert item_names
    for name, d1 in deltas[1.0].items():
        d3 = deltas[3.0][name]
        if name in item_names and "trainable_tokens_delta" not in name:
            rows = torch.tensor(ids)
            torch.testing.assert_close(d3[rows], 3.0 * d1[rows], atol=1e-7, rtol=1e-4)
            mask = torch.ones(d1.shape[0], dtype=torch.bool)
            mask[rows] = False
            torch.testing.assert_close(d3[mask], d1[mask], atol=0, rtol=0)
        elif name in item_names:
            torch.testing.assert_close(d3, 3.0 * d1, atol=1e-7, rtol=1e-4)
        else:
            torch.testing.assert_close(d3, d1, atol=0, rtol=0, msg=name)


def test_item_weight_decay_applies_to_item_rows_only(tiny_model_and_tokenizer, tiny_items) -> None:
    base, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(base, tok, tiny_items)
    after = []
    for wd in (0.0, 0.5):
        model = copy.deepcopy(base)
        built = build_method(model, GEMSConfig(method="adamw"), 0.1, item_token_ids=ids, loss="catalog",
                             item_weight_decay=wd)
        built.train_step({"search": [_item_batch(tok, ids, 1)], "rec": [_item_batch(tok, ids, 2)]})
        after.append(model.get_input_embeddings().weight.detach().clone())
    old = base.get_input_embeddings().weight.detach()
    rows = torch.tensor(ids)
    torch.testing.assert_close(after[1][rows] - after[0][rows], -0.1 * 0.5 * old[rows], atol=1e-6, rtol=1e-4)
    text = torch.ones(old.shape[0], dtype=torch.bool)
    text[rows] = False
    assert torch.equal(after[1][text], after[0][text])


def test_item_decay_to_init_pulls_rows_toward_their_start(tiny_model_and_tokenizer, tiny_items) -> None:
    """Step 1 leaves rows where wd=0 puts them (they are at their anchor); step 2 pulls by
    lr x wd x (row - start), and text rows never move differently."""
    base, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(base, tok, tiny_items)
    batch = {"search": [_item_batch(tok, ids, 1)], "rec": [_item_batch(tok, ids, 2)]}
    runs = []
    for wd in (0.0, 2.0):
        model = copy.deepcopy(base)
        built = build_method(model, GEMSConfig(method="adamw"), 0.1, item_token_ids=ids, loss="catalog",
                             item_weight_decay=wd, item_decay_to="init")
        weights = []
        for _ in range(2):
            built.train_step(batch)
            weights.append(model.get_input_embeddings().weight.detach().clone())
        runs.append(weights)
    start = base.get_input_embeddings().weight.detach()
    rows = torch.tensor(ids)
    torch.testing.assert_close(runs[1][0], runs[0][0], atol=0, rtol=0)
    moved = runs[0][0][rows] - start[rows]
    assert moved.abs().max() > 0
    torch.testing.assert_close(runs[1][1][rows] - runs[0][1][rows], -0.1 * 2.0 * moved, atol=1e-6, rtol=1e-4)
    text = torch.ones(start.shape[0], dtype=torch.bool)
    text[rows] = False
    assert torch.equal(runs[1][1][text], runs[0][1][text])


def test_item_decay_target_must_be_known() -> None:
    with pytest.raises(ValueError, match="item_decay_to"):
        ItemRows([], weight_decay=1.0, decay_to="mean")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- lean prompts


def test_auto_template_drops_the_injected_system_prompt(tiny_model_and_tokenizer) -> None:
    _, tok = tiny_model_and_tokenizer
    tok = copy.deepcopy(tok)
    tok.chat_template = SMOLLM2_TEMPLATE
    prompt = format_prompt("rec", [("3", "Stapler")], None, 2)
    text = tok.decode(encode_prompt(tok, prompt, 512))
    assert "system" not in text and "SmolLM" not in text
    assert text == f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def test_template_without_a_default_system_prompt_is_unchanged(tiny_model_and_tokenizer) -> None:
    _, tok = tiny_model_and_tokenizer
    prompt = format_prompt("rec", [("3", "Stapler")], None, 2)
    rendered = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    assert tok.decode(encode_prompt(tok, prompt, 512)) == rendered


def test_chat_template_none_gives_plain_text_after_bos(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg.model.model_copy(update={"chat_template": "none"})
    _, tok = load_backbone(cfg, tmp_path)
    prompt = format_prompt("search", [("3", "Stapler")], "pens", 2)
    ids = encode_prompt(tok, prompt, 512)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:]) == prompt


# ------------------------------------------------------------------------- length buckets


def test_length_buckets_cut_padding_and_keep_every_example_once_per_epoch() -> None:
    rng = np.random.default_rng(0)
    lengths = {t: rng.integers(5, 60, size=97).tolist() for t in ("search", "rec")}
    examples = {t: [TokenizedExample([1] * n, [-100] * (n - 1) + [2]) for n in lengths[t]]
                for t in ("search", "rec")}
    common = dict(batch_size=8, search_fraction=0.5, grad_accum=1, seed=3, pad_token_id=0)
    plain = MixedTaskBatcher(examples, **common)
    bucketed = MixedTaskBatcher(examples, **common, lengths=lengths, bucket_steps=8)
    steps = 97 * 3 // 4  # three epochs of each task

    def padding(batcher: MixedTaskBatcher) -> float:
        real = total = 0
        for step in range(steps):
            for mbs in batcher.batches_at(step).values():
                real += int(mbs[0].attention_mask.sum())
                total += mbs[0].attention_mask.numel()
        return 1 - real / total

    assert padding(bucketed) < 0.5 * padding(plain)
    seen = [i for step in range(97 // 4 * 4 // 4 * 4 // 4) for i in bucketed.indices_at(step)["rec"]]
    per_epoch = [i for step in range(0, 97 * 2) for i in bucketed.indices_at(step)["rec"]][:97 * 2]
    assert sorted(per_epoch[:97]) == list(range(97)) and sorted(per_epoch[97:]) == list(range(97))
    assert len(set(seen)) == len(seen)
    # pure function of the step: a fresh batcher (a resumed run) sees the same batches
    again = MixedTaskBatcher(examples, **common, lengths=lengths, bucket_steps=8)
    assert again.indices_at(150) == bucketed.indices_at(150)


def test_length_buckets_split_the_same_global_batches_across_ranks() -> None:
    lengths = {t: list(range(3, 3 + 50)) for t in ("search", "rec")}
    examples = {t: [TokenizedExample([1] * n, [-100] * (n - 1) + [2]) for n in lengths[t]]
                for t in ("search", "rec")}
    common = dict(batch_size=4, search_fraction=0.5, grad_accum=1, seed=1, pad_token_id=0,
                  lengths=lengths, bucket_steps=4)
    one = MixedTaskBatcher(examples, **common, rank=0, world_size=1)
    two = [MixedTaskBatcher(examples, **common, rank=r, world_size=2) for r in (0, 1)]
    for step in range(40):
        merged = two[0].indices_at(step)["search"] + two[1].indices_at(step)["search"]
        assert merged == one.indices_at(2 * step)["search"] + one.indices_at(2 * step + 1)["search"]


# ----------------------------------------------------------------- subspaces without noise


def test_basis_keeps_only_the_directions_a_rank_deficient_gradient_holds() -> None:
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 3, generator=gen) @ torch.randn(3, 24, generator=gen)  # rank 3
    for side in ("left", "right"):
        q = top_basis(g, 8, side, threshold=1e-3)
        used = (q.abs().sum(0) > 0).sum()
        assert int(used) == 3
        kept = q[:, :3]
        torch.testing.assert_close(kept.T @ kept, torch.eye(3), atol=1e-5, rtol=0)
        assert top_basis(g, 8, side, threshold=0.0).abs().sum(0).gt(0).all()  # 0 = keep everything


def test_task_subspace_learns_nothing_the_shared_one_explains() -> None:
    """Both tasks' gradients lie in one rank-2 span: the shared basis holds it all, so the task
    bases stay empty and GEMS's update equals the shared-only (task_subspaces=False) update."""
    gen = torch.Generator().manual_seed(1)
    span = torch.randn(16, 2, generator=gen)
    grads = [span @ torch.randn(2, 24, generator=gen) for _ in range(4)]
    updates = []
    for task_subspaces in (True, False):
        w = torch.nn.Parameter(torch.randn(16, 24, generator=torch.Generator().manual_seed(2)))
        cfg = GEMSConfig(r_shared=4, t_svd=100, k=0, task_subspaces=task_subspaces, alpha=1.0)
        opt = GEMSAdamW([("layers.0.q_proj.weight", w)], cfg, 1e-2, ["layers.0.q_proj.weight"])
        start = w.detach().clone()
        for step in range(2):
            g_s, g_r = grads[2 * step], grads[2 * step + 1]
            w.grad = 0.5 * g_s
            opt.capture_task_grad("search")
            w.grad = 0.5 * g_r if w.grad is None else w.grad + 0.5 * g_r  # as backward() accumulates
            opt.capture_task_grad("rec")
            opt.set_task_stats({"search": 1.0, "rec": 1.0}, {"search": 1, "rec": 1})
            opt.clip_grad_norm_(None)
            opt.step()
        updates.append(w.detach() - start)
        if task_subspaces:
            state = opt.state[w]
            assert float(state["q_search"].abs().sum()) == 0.0 and float(state["q_rec"].abs().sum()) == 0.0
    torch.testing.assert_close(updates[0], updates[1], atol=1e-6, rtol=1e-5)


def test_right_side_task_bases_avoid_the_protected_directions() -> None:
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(40, 24, generator=gen)
    u = torch.linalg.qr(torch.randn(24, 5, generator=gen)).Q
    shared = top_basis(g, 4, "right", orthogonal_to=u)
    task = top_basis(torch.randn(40, 24, generator=gen), 4, "right",
                     orthogonal_to=torch.cat([shared, u], dim=1))
    assert float((u.T @ shared).abs().max()) < 1e-5
    assert float((u.T @ task).abs().max()) < 1e-5 and float((shared.T @ task).abs().max()) < 1e-5


def test_steps_keep_working_with_rank_deficient_batches(tiny_model_and_tokenizer) -> None:
    """Two target tokens per task and rank 16: no NaN, no update from empty basis columns."""
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=16, t_svd=2, k=0), 1e-3)
    from optim_helpers import step_optimizer

    for step in range(3):
        stats = step_optimizer(model, opt, mixed_batches(len(tok), seed=step, rows=(2, 2)), 1.0)
        assert np.isfinite(stats.mixed_loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------- collaborative item init


def test_collab_init_carries_item_similarity_into_the_rows(tiny_model_and_tokenizer, tiny_items) -> None:
    from gems.item_init import aligned_vectors, init_item_rows

    model, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(model, tok, tiny_items)
    weight = model.get_input_embeddings().weight
    title = weight[torch.tensor(ids)].detach().clone()
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(len(ids), 6, generator=gen)
    vectors[1] = vectors[0] + 1e-3  # two items bought alike
    item_ids = [i for i, _ in tiny_items]
    shuffled = list(reversed(item_ids))
    aligned = aligned_vectors(vectors.flip(0), shuffled, item_ids)
    torch.testing.assert_close(aligned, vectors)
    before = weight.detach().clone()
    init_item_rows(model, ids, aligned, "collab")
    rows = weight[torch.tensor(ids)].detach()
    assert torch.allclose(rows[0], rows[1], atol=1e-2 * float(rows[0].norm()))
    assert not torch.allclose(rows, title)
    assert abs(float(rows.norm(dim=1).mean()) / float(title.norm(dim=1).mean()) - 1) < 0.6  # backbone scale
    text = torch.ones(weight.shape[0], dtype=torch.bool)
    text[torch.tensor(ids)] = False
    assert torch.equal(weight.detach()[text], before[text])  # text rows untouched
    mixed = copy.deepcopy(model)
    init_item_rows(mixed, ids, aligned, "title")
    assert torch.equal(mixed.get_input_embeddings().weight, weight)
    with pytest.raises(ValueError, match="no collaborative vector"):
        aligned_vectors(vectors, item_ids[:-1], item_ids)
    with pytest.raises(ValueError, match="items.init"):
        init_item_rows(model, ids, aligned, "random")


def test_refresh_reports_the_ranks_the_gradients_hold(tiny_model_and_tokenizer) -> None:
    """Two target tokens per task: each task's gradient has rank <= 2 on every weight, so the
    subspaces report far fewer directions in use than their configured ranks."""
    model, tok = tiny_model_and_tokenizer
    opt = GEMSAdamW.for_model(model, GEMSConfig(r_shared=16, t_svd=5, k=0), 1e-3)
    from optim_helpers import step_optimizer

    stats = step_optimizer(model, opt, mixed_batches(len(tok), seed=0, rows=(2, 2)), 1.0)
    assert stats.svd_refresh and set(stats.ranks) == {"shared", "search", "rec"}
    assert 0 < stats.ranks["shared"] < 16 and stats.ranks["search"] < 8 and stats.ranks["rec"] < 8
    assert "rank_shared" in stats.as_metrics()
    assert step_optimizer(model, opt, mixed_batches(len(tok), seed=1, rows=(2, 2)), 1.0).ranks == {}
