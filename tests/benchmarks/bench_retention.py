"""Cost and sanity of the retention measure on the real backbone (not collected by pytest).

Run: .venv/bin/python tests/benchmarks/bench_retention.py [--config demo] [--max-tokens 2048]
         [--mmlu 40] [--noise 0.02]

Measures SmolLM2-135M against itself (KL must be 0) and against a copy with Gaussian noise on every
weight (a stand-in for a damaged fine-tune), printing perplexity, KL, MMLU and wall time.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from gems.model import load_backbone
from gems.retention import measure_retention
from tune.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="demo")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--mmlu", type=int, default=None)
    parser.add_argument("--noise", type=float, default=0.02, help="relative weight noise")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    max_tokens = args.max_tokens or cfg.eval.retention_max_tokens
    mmlu = cfg.eval.mmlu_questions if args.mmlu is None else args.mmlu

    t0 = time.perf_counter()
    base, tokenizer = load_backbone(cfg.model, cfg.resolve(cfg.model.cache_dir))
    print(f"load {cfg.model.name_or_path}: {time.perf_counter() - t0:.1f} s")

    damaged = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():
            p.add_(torch.randn(p.shape, generator=g) * args.noise * p.std())

    for name, tuned in (("self", base), (f"noised x{args.noise}", damaged)):
        t0 = time.perf_counter()
        r = measure_retention(base, tuned, tokenizer, max_tokens=max_tokens, mmlu_questions=mmlu,
                              seed=cfg.data.seed)
        dt = time.perf_counter() - t0
        print(f"[{name}] {dt:.1f} s  tokens={r.tokens} ppl_base={r.ppl_base:.2f} "
              f"ppl_tuned={r.ppl_tuned:.2f} ratio={r.ppl_ratio:.3f} kl={r.kl:.4f} "
              f"item_mass={r.item_mass:.2e} mmlu_base={r.mmlu_base} mmlu_tuned={r.mmlu_tuned} "
              f"(n={r.mmlu_questions}) skipped={r.skipped}")


if __name__ == "__main__":
    main()
