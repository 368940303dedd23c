"""Quality study: GEMS vs AdamW, LoRA, GaLore and the popularity / BM25 / SASRec floors on the same splits.

Run:  .venv/bin/python pipelines/compare.py --config amazon \
          --methods gems,adamw,lora,galore,popularity,bm25 --seeds 0,1 --out docs/study
      .venv/bin/python pipelines/compare.py --smoke-test --out /tmp/compare-smoke
Ablations (DESIGN.md section 5 switches) are methods too: named variants
  gems-shared (gems.task_subspaces=false), gems-nonull (gems.k=0), gems-fixedgate (fixed_gate=0.5),
  gems-nocomp (complementary=false), gems-rotate|gems-keep|gems-reset (moment_transfer),
  gems-input|gems-output (nullspace_side)
or inline overrides of any method: --methods "gems,gems[k=0],gems[fixed_gate=0.5,tau=2],lora[lora_r=8]"
(bare keys are gems.* fields; train.lr is allowed per method; the budget - steps, batch, sequence
length, seed, data, eval - is shared and changes only with --set, for every method at once).
Loss reweighting against forgetting (train.token_weighting, gems/token_weighting.py) is a suffix of
any LLM method: --methods gems+talr,adamw+talr,adamw+flow.
SASRec (trained on the driver per seed, epoch picked on val; settings --set sasrec.*) is two methods:
  sasrec (history only) and sasrec-bm25 (search: z-score fusion with BM25, weight tuned on val):
  --methods popularity,bm25,sasrec,sasrec-bm25
Writes OUT/results.csv (method, task, metric, protocol, value, seed), OUT/results.md,
OUT/timings.csv, plots, and one MLflow parent run with a child run per LLM method and seed (SASRec's
best epoch, val NDCG@10 and fusion weight per seed are metrics of the parent run).
Re-running with the same --out skips the (method, seed) pairs already in results.csv (--no-resume
to start over). The config, the method list and the tracking store are checked before any data is
read or Ray starts (exit codes: pipelines/preflight.py).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.cli import Job, job_parser, load_job_config, setup_logging  # noqa: E402
from pipelines.preflight import PREFLIGHT_ERRORS, exit_code  # noqa: E402
from tune.registry.tracking import setup_tracking  # noqa: E402
from tune.study.methods import parse_methods, parse_seeds  # noqa: E402
from tune.study.run import run_comparison  # noqa: E402

DEFAULT_METHODS = "gems,adamw,lora,galore,popularity,itemknn,bm25"
JOB = Job("compare", "amazon")


def main(argv: list[str] | None = None) -> int:
    ap = job_parser(__doc__, JOB, set_example="train.max_steps=50",
                    smoke_help="tiny model, tiny synthetic data, seconds", epilog=True,
                    set_scope=" for every method")
    ap.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    ap.add_argument("--seeds", default="0", help="training seeds for the LLM methods, e.g. 0,1")
    ap.add_argument("--out", required=True, type=Path, help="output directory")
    ap.add_argument("--no-resume", action="store_true", help="ignore results already in --out")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep each run's Ray Train storage")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        cfg = load_job_config(args, JOB)
        specs = parse_methods(args.methods)
        seeds = parse_seeds(args.seeds)
        setup_tracking(cfg)  # a dead tracking server fails here, before any data is read
    except PREFLIGHT_ERRORS as err:
        return exit_code(err)
    command = "python pipelines/compare.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    outcome = run_comparison(cfg, specs, args.out, seeds, command=command, resume=not args.no_resume,
                             keep_checkpoints=args.keep_checkpoints, on_progress=print)
    print((args.out / "results.md").read_text())
    print(f"results: {outcome.files['csv']}  MLflow parent run: {outcome.parent_run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
