"""A whole training step at the study's batch, against this machine's matmul peak (MFU).

Run: .venv/bin/python tests/benchmarks/bench_step.py --model smollm2-135m --batch 16 --steps 6
     .venv/bin/python tests/benchmarks/bench_step.py --model smollm2-135m --attention sdpa  (kernel)
     .venv/bin/python tests/benchmarks/bench_step.py --model smollm2-135m --profile   (top ops)

In one process, side by side: the machine's fp32 and bf16 matmul peak (median GFLOP/s of a square
GEMM the size of the model's largest), then per method (AdamW, GEMS) and precision the median
whole-step time (``train_step`` with the catalog loss on prompts of the study's length), the
model FLOPs of that step (6 x non-embedding parameters x real tokens, plus the attention
scores, plus GEMS's second task pass costs nothing extra: each token is processed once) and
MFU = FLOPs / time / peak of the precision used. GEMS's refresh step (SVDs of the task gradients)
is timed apart, and the GEMS/AdamW whole-step ratio is given both without it and with it amortised
over ``--t-svd`` steps (``(refresh + (t_svd - 1) x step) / t_svd``), the figure a run pays.
``--r-shared`` sets GEMS's shared rank (task ranks half of it), ``--compile`` compiles the decoder
layers (``train.compile``), ``--precisions`` limits the precisions timed, ``--history-targets``
labels that many earlier item tokens per prompt, ``--heads items,full`` times the catalog loss's
item-rows head beside the whole-vocabulary head. Not a test: figures
depend on the load average, printed first and last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gems.compile import compile_decoder_layers
from gems.config import GEMSConfig, ModelConfig
from gems.methods import build_method
from gems.model import add_item_tokens, load_backbone
from gems.step import TaskBatch
from gems.subspace import target_parameter_names


def matmul_peak(size: int, dtype: torch.dtype, repeats: int = 7) -> float:
    """Median GFLOP/s of ``size``^3 GEMMs in ``dtype`` (what one step's big matmuls can reach)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * size ** 3 / statistics.median(times) / 1e9


def study_batches(tokenizer, item_ids: list[int], batch: int, length: int, seed: int,  # noqa: ANN001
                  history_targets: int = 0) -> dict:
    """Left-unpadded prompts of ``length`` tokens ending in an item target, half per task;
    ``history_targets`` more item tokens spread over each prompt are targets too."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    positions = [length - 1 - 2 * (j + 1) for j in range(history_targets)]
    for task, n in (("search", batch // 2), ("rec", batch - batch // 2)):
        ids = torch.randint(100, 40_000, (n, length), generator=gen)
        labels = torch.full_like(ids, -100)
        for p in [length - 1, *positions]:
            ids[:, p] = torch.tensor(item_ids)[torch.randint(0, len(item_ids), (n,), generator=gen)]
            labels[:, p] = ids[:, p]
        out[task] = [TaskBatch(ids, torch.ones_like(ids), labels)]
    return out


def random_bases(model: torch.nn.Module, cfg: GEMSConfig) -> dict[str, torch.Tensor]:
    """Orthonormal ``U_k`` per target weight (input side): the projection's cost at ``cfg.k``."""
    gen = torch.Generator().manual_seed(0)
    return {name: torch.linalg.qr(torch.randn(p.shape[1], cfg.k, generator=gen)).Q
            for name in target_parameter_names(model, cfg.target_modules)
            for p in [model.get_parameter(name)]}


def step_flops(model: torch.nn.Module, batch: int, length: int) -> float:
    """6 N T for the non-embedding weights plus the attention score/value products (fwd + bwd)."""
    embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    cfg = model.config
    attention = 6 * 2 * cfg.num_hidden_layers * batch * length * length * cfg.hidden_size
    return 6.0 * n * batch * length + attention


def time_steps(method, batches: dict, steps: int, dtype: torch.dtype | None,  # noqa: ANN001
               refresh_every: int) -> tuple[float, float]:
    """(median s of a plain step, median s of a refresh step). Step 0 refreshes GEMS's bases (and
    warms up kernels) and is not counted; ``steps`` later steps give the plain median; for
    GEMS the refresh is measured on two more steps whose bases are due again."""
    plain, refresh = [], []
    for i in range(steps + 1):
        start = time.perf_counter()
        method.train_step(batches, 1.0, dtype, measure_conflict=False)
        if i > 0 and (i % refresh_every) != 0:
            plain.append(time.perf_counter() - start)
    optimizer = getattr(method, "optimizer", None)
    if hasattr(optimizer, "request_refresh"):
        for _ in range(2):
            optimizer.request_refresh()
            start = time.perf_counter()
            method.train_step(batches, 1.0, dtype, measure_conflict=False)
            refresh.append(time.perf_counter() - start)
    return statistics.median(plain), statistics.median(refresh) if refresh else statistics.median(plain)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=52, help="prompt tokens (study prompts: ~52)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--t-svd", type=int, default=50)
    ap.add_argument("--k", type=int, default=0, help="GEMS null-space rank (random orthonormal bases; "
                    "the projection's cost, not its content)")
    ap.add_argument("--attention", default="auto", choices=("auto", "eager", "sdpa"))
    ap.add_argument("--r-shared", type=int, default=16, help="GEMS shared rank (task ranks: half)")
    ap.add_argument("--compile", action="store_true", help="compile the decoder layers (train.compile)")
    ap.add_argument("--precisions", default="bf16,fp32", help="comma-separated: bf16, fp32")
    ap.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one step")
    ap.add_argument("--history-targets", type=int, default=0, help="earlier item tokens per prompt that "
                    "are targets too (train.history_targets, weight 1)")
    ap.add_argument("--heads", default="items", help="comma-separated: items (the catalog loss's "
                    "item-rows head, gems.catalog_head), full (the whole vocabulary head, for comparison)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}  threads: {args.threads}  attention: {args.attention}  "
          f"r_shared: {args.r_shared}  k: {args.k}  t_svd: {args.t_svd}  compile: {args.compile}")
    model, tok = load_backbone(ModelConfig(name_or_path=args.model, attention=args.attention), _cache())
    item_ids = add_item_tokens(model, tok, [(f"i{i}", f"office item {i}") for i in range(2420)])
    size = max(model.config.hidden_size, model.config.intermediate_size)
    peaks = {"fp32": matmul_peak(size * 2, torch.float32),
             "bf16": matmul_peak(size * 2, torch.bfloat16)}
    print(f"matmul peak ({size * 2}^3 GEMM): fp32 {peaks['fp32']:.1f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.1f} GFLOP/s")
    batches = study_batches(tok, item_ids, args.batch, args.length, seed=0,
                            history_targets=args.history_targets)
    plain_head = model.lm_head
    flops = step_flops(model, args.batch, args.length)
    print(f"model FLOPs per step ({args.batch} x {args.length} tokens): {flops / 1e9:.1f} GFLOP")
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    dtypes = {"bf16": torch.bfloat16, "fp32": None}
    heads = [h.strip() for h in args.heads.split(",") if h.strip()]
    runs = [(p, n, h) for p in precisions for n in ("adamw", "gems") for h in heads]
    for precision, name, head in runs:
        dtype = dtypes[precision]
        # a wrapped head is not a plain linear layer: the step then computes the full vocabulary
        model.lm_head = plain_head if head == "items" else torch.nn.Sequential(plain_head)
        model.load_state_dict(base_state, strict=False)
        cfg = GEMSConfig(method=name, k=args.k, t_svd=args.t_svd, r_shared=args.r_shared)
        bases = random_bases(model, cfg) if name == "gems" and args.k else None
        method = build_method(model, cfg, 1e-5, bases, item_token_ids=item_ids, loss="catalog",
                              history_weight=1.0 if args.history_targets else 0.0)
        if args.compile:
            compile_decoder_layers(method.model)
        if args.profile and precision == precisions[0]:
            _profile(method, batches, dtype)
        seconds, refresh = time_steps(method, batches, args.steps, dtype, refresh_every=args.t_svd)
        results[(name, precision, head)] = (seconds, refresh)
        mfu = flops / seconds / (peaks[precision] * 1e9)
        extra = f", refresh step {refresh:.2f} s" if name == "gems" else ""
        print(f"{name:5s} {precision} {head}-head: {seconds:.2f} s/step (median of {args.steps}){extra}, "
              f"{flops / seconds / 1e9:.1f} GFLOP/s, MFU {100 * mfu:.0f}% of the {precision} peak")
    model.lm_head = plain_head
    for precision in precisions:
        for head in heads:
            gems, refresh = results[("gems", precision, head)]
            adamw = results[("adamw", precision, head)][0]
            amortised = (refresh + (args.t_svd - 1) * gems) / args.t_svd
            print(f"GEMS / AdamW whole step ({precision}, {head} head): {gems / adamw:.2f} without the "
                  f"refresh, {amortised / adamw:.2f} with it amortised over t_svd={args.t_svd}")
        if len(heads) > 1:
            for name in ("adamw", "gems"):
                times = {h: results[(name, precision, h)][0] for h in heads}
                print(f"{name} {precision}: full head / items head = {times['full'] / times['items']:.2f}")
    print(f"load average after: {os.getloadavg()}")


def _profile(method, batches: dict, dtype: torch.dtype | None) -> None:  # noqa: ANN001
    from torch.profiler import ProfilerActivity, profile

    method.train_step(batches, 1.0, dtype, measure_conflict=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        method.train_step(batches, 1.0, dtype, measure_conflict=False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def _cache():  # noqa: ANN202
    from pathlib import Path

    from gems.config import PROJECT_ROOT

    return Path(PROJECT_ROOT) / ".state" / "cache" / "models"


if __name__ == "__main__":
    main()
