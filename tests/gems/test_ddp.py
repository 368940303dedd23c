"""DDP with two gloo processes: gradients are all-reduced before GEMS, so both ranks stay identical."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS = 10


GENERAL_TEXT = "\n".join(f"Paragraph {i}: the river runs past the old mill and the town {i % 7} sleeps."
                         for i in range(64))


def _setup(tmp: Path):  # noqa: ANN202 - (model, tokenizer, method)
    """The same start in every process. The general corpus is a file of the test's own: left to the
    machine (shared wikitext, or generated text), processes that resolve it differently compute
    different null spaces, and the comparison would test the machine, not DDP."""
    from gems.config import GEMSConfig, ModelConfig
    from gems.methods import build_method
    from gems.model import load_backbone
    from gems.nullspace import bases_for_run

    torch.set_num_threads(1)
    corpus = tmp / "general.txt"
    if not corpus.exists():
        corpus.write_text(GENERAL_TEXT)
    model, tok = load_backbone(ModelConfig(name_or_path="tiny-llama"), tmp / "models")
    cfg = GEMSConfig(r_shared=4, t_svd=3, k=8, general_max_tokens=512, general_corpus=str(corpus))
    bases = bases_for_run(model, tok, cfg, None)  # every rank computes the same bases
    return model, tok, build_method(model, cfg, 1e-3, bases)


def _rank_batches(vocab: int, rank: int, step: int):  # noqa: ANN202
    from optim_helpers import mixed_batches

    return mixed_batches(vocab, seed=1000 * step + rank, rows=(3, 2) if rank == 0 else (2, 3))


def _worker(rank: int, world: int, tmp: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        model, tok, method = _setup(Path(tmp))
        ddp = DistributedDataParallel(model)
        losses = []
        for step in range(STEPS):
            stats = method.train_step(_rank_batches(len(tok), rank, step), max_grad_norm=1.0,
                                      measure_conflict=step % 2 == 0, model=ddp)
            losses.append(stats.mixed_loss)
        torch.save({"params": {n: p.detach() for n, p in model.named_parameters()}, "losses": losses},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_stay_identical_and_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"ranks differ on {name}"
    assert r0["losses"] == r1["losses"]  # losses are reduced over ranks too

    # one process, both ranks' examples as micro-batches of the same step: the same global gradient.
    # Adam normalises each coordinate, so round-off in the all-reduce (~1e-7 of a gradient) grows on
    # coordinates whose gradients nearly cancel: the trajectories agree to a share of each tensor's
    # movement, not to an absolute 1e-5 (that failed on another CPU). A wrongly scaled or missing
    # reduction moves tensors by a different amount altogether, and changes the clipped loss path.
    model, tok, method = _setup(tmp_path)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = []
    for step in range(STEPS):
        parts = [_rank_batches(len(tok), r, step) for r in (0, 1)]
        both = {t: parts[0][t] + parts[1][t] for t in ("search", "rec")}
        stats = method.train_step(both, max_grad_norm=1.0, measure_conflict=step % 2 == 0)
        losses.append(stats.mixed_loss)
    assert r0["losses"] == pytest.approx(losses, rel=1e-4)
    for name, p in model.named_parameters():
        moved_ddp = r0["params"][name] - start[name]
        moved_one = p.detach() - start[name]
        assert moved_ddp.abs().max() > 0, f"{name} did not train"
        gap = (moved_ddp - moved_one).abs().max().item()
        assert gap <= 0.02 * moved_one.abs().max().item() + 1e-6, \
            f"{name}: DDP and one process differ by {gap:.2e}"
