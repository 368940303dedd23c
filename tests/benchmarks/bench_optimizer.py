"""GEMS optimizer figures: two-pass overhead, optimizer.step times, SVD refresh, memory.

Run: .venv/bin/python tests/benchmarks/bench_optimizer.py --model tiny-llama
     .venv/bin/python tests/benchmarks/bench_optimizer.py --model smollm2-135m --tokens 4096 --steps 5

Medians over ``--steps`` timed steps after ``--warmup`` untimed ones. Whole-step ratio: a GEMS
step (two task passes + capture + step) plus one SVD refresh amortised over T_svd=200, against
AdamW with ONE mixed-batch pass + its step (the cheapest AdamW step). Peak RSS comes from one
subprocess per method (same model, same steps), so the methods do not share a high-water mark.
Not a test: figures depend on the machine's load (printed first).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch
from torch import nn

from gems.config import Config, GEMSConfig, ModelConfig
from gems.costs import optimizer_state_mb
from gems.methods import Method, build_method
from gems.model import load_backbone
from gems.nullspace import bases_for_run
from gems.step import TaskBatch, task_ce_sum, train_step
from gems.subspace import target_parameter_names

T_SVD_AMORTISED = 200
SEQ = 128


def batches_for(tokens: int, vocab: int, seed: int = 0) -> dict[str, list[TaskBatch]]:
    rows = max(2, tokens // SEQ)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for task, n in (("search", rows // 2), ("rec", rows - rows // 2)):
        ids = torch.randint(10, vocab, (n, SEQ), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[:, -1] = ids[:, -1]
        out[task] = [TaskBatch(ids, torch.ones_like(ids), labels)]
    return out


def one_pass(model: nn.Module, batches: dict[str, list[TaskBatch]]) -> None:
    model.zero_grad(set_to_none=True)
    parts = [b for task in ("search", "rec") for b in batches[task]]
    mixed = TaskBatch(torch.cat([b.input_ids for b in parts]), torch.cat([b.attention_mask for b in parts]),
                      torch.cat([b.labels for b in parts]))
    (task_ce_sum(model, mixed) / mixed.target_tokens).backward()


def make_method(name: str, model: nn.Module, cfg: GEMSConfig, bases, t_svd: int) -> Method:  # noqa: ANN001
    return build_method(model, cfg.model_copy(update={"method": name, "t_svd": t_svd}), 1e-5, bases)


def method_loop(method: Method, model: nn.Module, batches: dict[str, list[TaskBatch]], steps: int,
                warmup: int) -> dict[str, float]:
    """Median seconds of the passes (+ GEMS captures) and of ``optimizer.step`` over timed steps.

    GEMS runs its two task passes and captures between them; baselines run one mixed pass.
    """
    opt = method.optimizer
    counts = {t: sum(b.target_tokens for b in batches[t]) for t in ("search", "rec")}
    total = sum(counts.values())
    passes, captures, stepping = [], [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        capture = 0.0
        if method.name == "gems":
            opt.zero_grad()
            for task in ("search", "rec"):
                for b in batches[task]:
                    (task_ce_sum(model, b) / total).backward()
                t1 = time.perf_counter()
                opt.capture_task_grad(task, keep_full=False)
                capture += time.perf_counter() - t1
            opt.set_task_stats({"search": 1.0, "rec": 1.0}, counts)
            opt.clip_grad_norm_(1.0)
        else:
            one_pass(model, batches)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if i >= warmup:
            passes.append(t1 - t0 - capture)
            captures.append(capture)
            stepping.append(t2 - t1)
    med = statistics.median
    return {"passes": med(passes), "capture": med(captures), "step": med(stepping)}


def analytic(dims: dict, r: int, r_task: int, k: int) -> dict[str, float]:
    """Optimizer memory in GiB (fp32) for a Llama-like model: AdamW, GaLore, GEMS (+ its extra grad)."""
    h, inter, layers, vocab = dims["hidden"], dims["inter"], dims["layers"], dims["vocab"]
    kv = dims["kv_dim"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter)] * layers
    target = sum(m * n for m, n in shapes)
    other = vocab * h * (1 if dims["tied"] else 2) + layers * 2 * h + h
    gib = 4 / 2**30
    adamw = 2 * (target + other) * gib
    galore = sum(r * min(m, n) + 2 * r * max(m, n) for m, n in shapes) * gib + 2 * other * gib
    gems = 0.0
    for m, n in shapes:
        ranks = [r, r_task, r_task]
        gems += sum(q * min(m, n) + 2 * q * max(m, n) for q in ranks) + n * k
    gems = gems * gib + 2 * other * gib
    return {"params_B": (target + other) / 1e9, "adamw": adamw, "galore": galore, "gems": gems,
            "gems_extra_grad_at_refresh": target * gib}


QWEN_3B = {"hidden": 2048, "inter": 11008, "layers": 36, "vocab": 151936, "kv_dim": 256, "tied": True}
SMOLLM2 = {"hidden": 576, "inter": 1536, "layers": 30, "vocab": 49152, "kv_dim": 192, "tied": True}


def project_config(model_name: str) -> Config:
    """Default project config (state under .state/, as the demo) for ``model_name``."""
    return Config(model=ModelConfig(name_or_path=model_name))


def load(model_name: str):  # noqa: ANN201
    cfg = project_config(model_name)
    return load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))


def rss_child(args: argparse.Namespace) -> None:
    """Subprocess: train ``--rss-of`` for a few steps, print peak RSS (MiB) as JSON."""
    model, tok = load(args.model)
    cfg = GEMSConfig(k=args.k, general_max_tokens=2048)
    bases = bases_for_run(model, tok, cfg, project_config(args.model).resolve("cache/nullspace"))
    method = make_method(args.rss_of, model, cfg, bases, t_svd=2)
    batches = batches_for(args.tokens, len(tok))
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:  # the high-water mark of loading is not the optimizer's: sample training only
        while not done.wait(0.02):
            peak.append(process.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(2):  # a refresh step (full gradients kept), then a plain one
        train_step(method.model, method, batches, 1.0, measure_conflict=False)
    done.set()
    sampler.join()
    print(json.dumps({"rss_before_mib": before / 2**20, "peak_rss_mib": max(peak) / 2**20,
                      "state_mib": optimizer_state_mb(method.optimizer)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-llama", choices=["tiny-llama", "smollm2-135m"])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per optimizer step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest when shared)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--no-rss", action="store_true", help="skip the per-method peak-RSS subprocesses")
    parser.add_argument("--rss-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_of:
        rss_child(args)
        return
    print(f"# bench_optimizer: {args.model}, {args.tokens} tokens/step, median of {args.steps} after "
          f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
          f"{args.threads} threads")
    model, tok = load(args.model)
    cfg = GEMSConfig(k=args.k, general_max_tokens=2048)
    t0 = time.perf_counter()
    bases = bases_for_run(model, tok, cfg, project_config(args.model).resolve("cache/nullspace"))
    print(f"null-space bases: {time.perf_counter() - t0:.1f} s ({bases.describe()})")
    batches = batches_for(args.tokens, len(tok))
    rows: list[tuple[str, str]] = []

    figures: dict[str, dict[str, float]] = {}
    state_mib: dict[str, float] = {}
    for label, name, t_svd in (("adamw", "adamw", T_SVD_AMORTISED), ("galore", "galore", T_SVD_AMORTISED),
                               ("gems", "gems", T_SVD_AMORTISED), ("gems-refresh", "gems", 1)):
        m = copy.deepcopy(model)
        method = make_method(name, m, cfg, bases, t_svd=t_svd)
        warmup = max(1, args.warmup) if t_svd > 1 else args.warmup  # step 0 of a t_svd=200 run refreshes
        t0 = time.perf_counter()
        figures[label] = method_loop(method, m, batches, args.steps, warmup)
        print(f"  {label}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        state_mib[label] = optimizer_state_mb(method.optimizer)
        del m, method
        gc.collect()
    one, two = figures["adamw"]["passes"], figures["gems"]["passes"]
    rows += [("fwd+bwd: two task passes (GEMS)", f"{two:.3f} s"),
             ("fwd+bwd: one mixed pass (AdamW)", f"{one:.3f} s"),
             ("two-pass / one-pass (target <= 1.10)", f"{two / one:.3f}"),
             ("GEMS capture between/after passes (lean)", f"{figures['gems']['capture']:.3f} s")]
    for name in ("adamw", "galore", "gems"):
        rows.append((f"optimizer.step {name}", f"{figures[name]['step']:.3f} s"))
    refresh_cost = figures["gems-refresh"]["step"] - figures["gems"]["step"]
    gems_whole = two + figures["gems"]["capture"] + figures["gems"]["step"] + refresh_cost / T_SVD_AMORTISED
    adamw_whole = one + figures["adamw"]["step"]
    refresh_step = figures["gems-refresh"]["step"]
    rows += [("GEMS optimizer.step with SVD refresh (every step)", f"{refresh_step:.3f} s"),
             ("SVD refresh cost (refresh step - plain step)", f"{refresh_cost:.3f} s"),
             (f"GEMS whole step, SVD amortised over {T_SVD_AMORTISED}", f"{gems_whole:.3f} s"),
             ("AdamW whole step (1 mixed pass + step)", f"{adamw_whole:.3f} s"),
             ("GEMS / AdamW whole step (target <= 1.30)", f"{gems_whole / adamw_whole:.3f}")]
    names = target_parameter_names(model, cfg.target_modules)
    target_mib = sum(p.numel() for n, p in model.named_parameters() if n in names) * 4 / 2**20
    for name in ("adamw", "galore", "gems"):
        rows.append((f"optimizer state {name}", f"{state_mib[name]:.1f} MiB"))
    rows.append(("GEMS extra gradient buffer (refresh/conflict steps only)", f"{target_mib:.1f} MiB"))
    rows.append(("GEMS state + extra buffer / AdamW state (target <= 1)",
                 f"{(state_mib['gems'] + target_mib) / state_mib['adamw']:.3f}"))
    if not args.no_rss:
        for name in ("adamw", "galore", "gems"):
            cmd = [sys.executable, __file__, "--model", args.model, "--tokens", str(args.tokens),
                   "--threads", str(args.threads), "--k", str(args.k), "--rss-of", name]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rss = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((f"peak RSS while training {name} (2 steps, own process; model loaded: "
                         f"{rss['rss_before_mib']:.0f} MiB)", f"{rss['peak_rss_mib']:.0f} MiB"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'figure'.ljust(width)} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")
    print("\nAnalytic optimizer memory (GiB, fp32; GEMS r=16/8/8, k=32; GaLore r=16; non-targets AdamW):")
    print("| model | params (B) | AdamW | GaLore | GEMS | GEMS extra grad at refresh |")
    print("|---|---|---|---|---|---|")
    for label, dims in (("SmolLM2-135M", SMOLLM2), ("Qwen2.5-3B", QWEN_3B)):
        a = analytic(dims, 16, 8, 32)
        print(f"| {label} | {a['params_B']:.3f} | {a['adamw']:.2f} | {a['galore']:.2f} | {a['gems']:.2f} | "
              f"{a['gems_extra_grad_at_refresh']:.2f} |")


if __name__ == "__main__":
    main()
