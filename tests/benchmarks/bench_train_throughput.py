"""Training throughput on Ray Train: tokens/s per method and worker count (not a pytest test).

Run: .venv/bin/python tests/benchmarks/bench_train_throughput.py [--config demo]
         [--methods gems,adamw,lora,galore] [--workers 1,2] [--steps 5] [--cpus 2]
Each (method, workers) pair is a short real run of the trainer on the config's shards: a warm-up
window of ``--steps`` steps, then a timed window of ``--steps`` steps (reported as one window, so
the conflict coefficient is measured once per window as in a normal run). The figure is that
window's tokens/s (all workers together, training time only), with its mean step time and the
precision the start-up probe chose. The machine's ``--cpus`` are split
evenly between workers. Run it on an otherwise idle machine: timings of a shared one mean little.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import ray  # noqa: E402

from pipelines.train import shards_ready  # noqa: E402
from tune.config import load_config  # noqa: E402
from tune.train.bases import prepare_bases  # noqa: E402
from tune.train.trainer import run_training  # noqa: E402


def measure(config: str, method: str, workers: int, steps: int, cpus: int,
            extra: list[str], storage: Path) -> dict[str, float | str]:
    total = 2 * steps
    cfg = load_config(config, [
        f"gems.method={method}", f"train.num_workers={workers}",
        f"train.cpus_per_worker={cpus / workers}", f"train.max_steps={total}",
        f"train.report_every={steps}", f"train.checkpoint_every={total}", "train.checkpoints_to_keep=1",
        f"train.storage_path={storage}", "eval.max_examples=1", "train.max_failures=0", *extra])
    outcome = run_training(cfg, shards_ready(cfg), prepare_bases(cfg),
                           run_name=f"bench-{method}-{workers}w")
    timed = outcome.history[-1]
    assert timed["step"] == total, timed["step"]
    shutil.rmtree(outcome.run_path, ignore_errors=True)  # checkpoints of a 135M model are large
    return {"method": method, "workers": workers, "tokens_per_s": timed["train/tokens_per_s"],
            "step_s": timed["train/step_time_s"], "precision": str(outcome.precision.get("precision")),
            "loss_first_window": outcome.history[0]["train/loss"], "loss_last_window": timed["train/loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="demo")
    ap.add_argument("--methods", default="gems,adamw,lora,galore")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    storage = Path(tempfile.mkdtemp(prefix="bench-train-"))
    rows = []
    try:
        for workers in [int(w) for w in args.workers.split(",")]:
            for method in args.methods.split(","):
                row = measure(args.config, method, workers, args.steps, args.cpus, args.set, storage)
                print(row, flush=True)
                rows.append(row)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    print(f"\n| method | workers | tokens/s (steps {args.steps + 1}-{2 * args.steps}) | step s | precision |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['workers']} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} | "
              f"{r['precision']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
