"""Preprocessing throughput and peak memory: Ray Data pipeline vs single-process polars.

Both run the same transform (gems.data: validate -> dedupe -> join items -> histories -> examples
-> split -> Parquet shards) on the same simulated logs in the same run: Ray Data with
``data.num_buckets`` user buckets (2 CPUs), the reference in one process with plain polars over all
users at once (gems.data.inprocess, ``num_buckets=1``). Each measurement runs in its own
subprocess so peak-memory figures do not mix. Memory: for polars the process's peak RSS; for Ray
the peak of the summed PSS of the driver and every Ray process it started (shared object-store
pages counted once), and the peak RSS of the largest single process.

Targets: Ray Data throughput >= 0.5x polars on 2 cores; Ray Data's memory bounded (1M vs 4M
events, with buckets scaled so each holds as many users).

``--source qilin`` runs the same on Qilin-format logs (gems.data.qilin_synth: the simulator written in
Qilin's CSV layout, read by the real Qilin parser) where each size is millions of *users and notes*
(one day, ~1.3 events per user): the Qilin path at the scale of the full release (~1.9M notes).

Run: .venv/bin/python tests/benchmarks/bench_preprocess.py [--sizes 1 4] [--workdir /tmp/gems-bench]
     .venv/bin/python tests/benchmarks/bench_preprocess.py --source qilin --sizes 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

USERS_PER_MILLION = 20_000  # x 4 days x 10 clicks (+30% impressions) ~ 1.04M events
BUCKETS_PER_MILLION = 16
DAYS = 4
ROWS_PER_FILE = 250_000  # same input unit at every size: a Ray task's input does not grow with data


QILIN_EVENTS_PER_USER = 1.0  # (+30% impressions): ~1.3 events per user and day, one day


def _qilin_params(millions: int) -> object:
    from gems.data.simulate import SimulationParams

    return SimulationParams(users=1_000_000 * millions, items=1_000_000 * millions, days=1, seed=0,
                            events_per_user_day=QILIN_EVENTS_PER_USER)


def _overrides(workdir: Path, millions: int, buckets: int, out: str, source: str = "synthetic") -> list[str]:
    if source == "qilin":
        return [f"state_dir={workdir}", "data.source=qilin", f"data.path=raw/qilin-{millions}m",
                f"data.num_buckets={buckets}", "data.now_ts=1800000000", f"data.output_dir={out}",
                "data.history_len=10"]
    return [f"state_dir={workdir}", "data.source=synthetic", f"data.path=raw/{millions}m",
            f"data.synthetic_users={USERS_PER_MILLION * millions}",
            f"data.synthetic_items={USERS_PER_MILLION * millions}", f"data.synthetic_days={DAYS}",
            "data.synthetic_events_per_user_day=10", f"data.num_buckets={buckets}",
            "data.now_ts=1800000000", f"data.output_dir={out}", "data.history_len=10"]


class TreeMemory:
    """Samples the summed PSS of this process and its descendants, and the largest single RSS."""

    def __init__(self, interval_s: float = 0.2) -> None:
        import psutil

        self.root, self.interval_s = psutil.Process(), interval_s
        self.peak_pss = self.peak_single_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for p in [self.root, *self.root.children(recursive=True)]:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += info.pss
                self.peak_single_rss = max(self.peak_single_rss, info.rss)
            self.peak_pss = max(self.peak_pss, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def worker(engine: str, workdir: Path, millions: int, repeats: int, source: str = "synthetic") -> dict:
    from tune.config import load_config

    buckets = BUCKETS_PER_MILLION * millions if engine == "ray" else 1
    cfg = load_config("tiny", _overrides(workdir, millions, buckets, f"out/{source}-{engine}-{millions}m",
                                         source))
    times, manifest, memory = [], {}, None
    if engine == "ray":
        import ray

        from tune.ingest.preprocess import run_preprocess

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        with TreeMemory() as memory:
            for _ in range(repeats):
                t0 = time.perf_counter()
                manifest = run_preprocess(cfg)
                times.append(time.perf_counter() - t0)
        ray.shutdown()
        mem = {"peak_tree_pss_mb": memory.peak_pss / 2**20,
               "peak_single_process_rss_mb": memory.peak_single_rss / 2**20}
    else:
        from gems.data.inprocess import preprocess_inprocess

        for _ in range(repeats):
            t0 = time.perf_counter()
            manifest = preprocess_inprocess(cfg)
            times.append(time.perf_counter() - t0)
        mem = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return {"engine": engine, "millions": millions, "events": manifest["accounting"]["rows_in"],
            "examples": manifest["examples"], "seconds": times, "buckets": buckets,
            "fingerprint": manifest["fingerprint"], **mem}


def _simulate(workdir: Path, millions: int, source: str = "synthetic") -> float:
    from gems.data.simulate import SimulationParams, simulate

    if source == "qilin":
        from gems.data.qilin_synth import QILIN_MARKER, write_qilin

        target = workdir / "raw" / f"qilin-{millions}m"
        if (target / QILIN_MARKER).exists():
            return float("nan")
        t0 = time.perf_counter()
        write_qilin(target, _qilin_params(millions))  # type: ignore[arg-type]
        return time.perf_counter() - t0
    target = workdir / "raw" / f"{millions}m"
    if (target / "simulation.json").exists():
        return float("nan")
    t0 = time.perf_counter()
    simulate(target, SimulationParams(users=USERS_PER_MILLION * millions, items=USERS_PER_MILLION * millions,
                                      days=DAYS, seed=0, events_per_user_day=10),
             rows_per_file=ROWS_PER_FILE)
    return time.perf_counter() - t0


def _run(engine: str, workdir: Path, millions: int, repeats: int, source: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", engine, "--workdir", str(workdir), "--sizes",
           str(millions), "--repeats", str(repeats), "--source", source]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    if res.returncode != 0:
        raise RuntimeError(f"{engine} {millions}M failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 4], help="millions of events (approx.)")
    ap.add_argument("--workdir", default="/tmp/gems-bench-preprocess")
    ap.add_argument("--repeats", type=int, default=2, help="runs per engine; the last (warm) counts")
    ap.add_argument("--source", choices=["synthetic", "qilin"], default="synthetic",
                    help="qilin: sizes are millions of users and notes in Qilin's CSV layout")
    ap.add_argument("--worker", choices=["ray", "polars"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    workdir = Path(args.workdir)
    if args.worker:
        print(json.dumps(worker(args.worker, workdir, args.sizes[0], args.repeats, args.source)))
        return
    rows = []
    unit = "M users and notes (Qilin layout)" if args.source == "qilin" else "M events"
    for millions in args.sizes:
        sim_s = _simulate(workdir, millions, args.source)
        print(f"wrote ~{millions}{unit} in {sim_s:.1f} s", flush=True)
        for engine in ("polars", "ray"):
            r = _run(engine, workdir, millions, args.repeats, args.source)
            rows.append(r)
            print(json.dumps(r), flush=True)
    print("\nevents     engine  buckets  cold s  warm s  ev/s (warm)  memory")
    by = {(r["engine"], r["millions"]): r for r in rows}
    for r in rows:
        mem = (f"peak RSS {r['peak_rss_mb']:.0f} MB" if r["engine"] == "polars" else
               f"peak PSS(all Ray procs) {r['peak_tree_pss_mb']:.0f} MB, largest process "
               f"{r['peak_single_process_rss_mb']:.0f} MB")
        print(f"{r['events']:>9,}  {r['engine']:>6}  {r['buckets']:>7}  {r['seconds'][0]:6.1f}  "
              f"{r['seconds'][-1]:6.1f}  {r['events'] / r['seconds'][-1]:>14,.0f}  {mem}")
    for millions in args.sizes:
        ray_r, pol = by[("ray", millions)], by[("polars", millions)]
        ratio = pol["seconds"][-1] / ray_r["seconds"][-1]
        print(f"~{millions}M: Ray Data throughput = {ratio:.2f}x polars (target >= 0.5x); "
              f"same examples: {ray_r['examples'] == pol['examples']}")
    if len(args.sizes) > 1:
        lo, hi = min(args.sizes), max(args.sizes)
        for engine, key in (("polars", "peak_rss_mb"), ("ray", "peak_single_process_rss_mb"),
                            ("ray", "peak_tree_pss_mb")):
            a, b = by[(engine, lo)][key], by[(engine, hi)][key]
            print(f"{engine} {key}: {lo}M {a:.0f} MB -> {hi}M {b:.0f} MB "
                  f"(x{b / a:.2f} for x{hi / lo:.0f} data)")


if __name__ == "__main__":
    main()
