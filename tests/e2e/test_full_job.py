"""The main job as users run it: `ray job submit --working-dir . -- python pipelines/full.py --smoke-test`.

One submission against a real `ray start --head` (free ports, 127.0.0.1) and a real SQLite MLflow
store given by absolute path in MLFLOW_TRACKING_URI. The sweep gets three fixed points, the first
outside the valid range (gems.tau <= 0), so one trial fails and the sweep must still finish.
Then the store must hold the parent run, the child runs with their metrics and the failed one,
and a registered model whose `champion` loads in a fresh process and ranks the test examples
exactly as the job's evaluation did. Teardown stops only this head's processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import polars as pl
import pytest
from head_processes import stop_head
from mlflow import MlflowClient

from gems.data.shards import read_split
from gems.evaluate import subsample_per_task
from tune.config import load_config

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
POINTS = ("tune.points_to_evaluate=[{gems.tau: -1.0, gems.r_shared: 4}, {gems.tau: 1.0, gems.r_shared: 4}, "
          "{gems.tau: 2.0, gems.r_shared: 6}]")
SPACE = "tune.space={gems.tau: {low: -1.0, high: 3.0}, gems.r_shared: {low: 2, high: 8, integer: true}}"


@pytest.fixture
def ray_head(tmp_path: Path) -> Iterator[dict[str, str]]:
    """`infra/start_ray_head.sh` with a private temp dir; yields the exported addresses."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "NUM_CPUS": "2", "RAY_TEMP_DIR": temp_dir, "STATE_DIR": str(tmp_path / "head")}
    try:
        subprocess.run([str(ROOT / "infra" / "start_ray_head.sh")], env=env, check=True, capture_output=True,
                       text=True, timeout=180)
        exports = dict(re.findall(r"export (\w+)=(\S+)", (tmp_path / "head" / "ray_head.env").read_text()))
        yield {**exports, "temp_dir": temp_dir}
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submitted_smoke_job_tracks_sweep_and_registers_a_servable_champion(ray_head: dict[str, str],
                                                                            tmp_path: Path) -> None:
    state, db = tmp_path / "state", tmp_path / "tracking" / "mlflow.db"
    uri = f"sqlite:///{db}"
    db.parent.mkdir()
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri, "GEMS_GIT_SHA": "e2e-test"}}
    exports = {k: v for k, v in ray_head.items() if k.isupper()}
    env = {**os.environ, **exports, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    started = time.monotonic()
    command = [str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["RAY_ADDRESS"],
               "--working-dir", ".", "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "pipelines/full.py", "--smoke-test", "--set", f"state_dir={state}",
               "--set", "tune.num_samples=3", "--set", SPACE, "--set", POINTS]
    for _ in range(30):  # the head's job agent may still be starting on a loaded machine
        job = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
        log = job.stdout + job.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(5)
    assert job.returncode == 0, log[-6000:]
    assert "registered: models:/gems-sr/1" in log, log[-3000:]
    print(f"job wall time {time.monotonic() - started:.0f} s")
    unpacked = Path(ray_head["temp_dir"]).glob("session_*/runtime_resources/working_dir_files/*/**/*")
    uploaded = [p for p in unpacked if p.is_file()]
    assert uploaded and {"gems", "tune", "pipelines"} <= {p.parts[p.parts.index("working_dir_files") + 2]
                                                          for p in uploaded}
    assert sum(p.stat().st_size for p in uploaded) < 5e6, "the working_dir upload must be code only"
    assert not [p for p in uploaded if {".venv", ".state", ".git"} & set(p.parts)]

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("gems-sr")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.data.tags["gems.git_sha"] == "e2e-test" and parent.data.tags["gems.data_fingerprint"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    finished = [c for c in children if c.info.status == "FINISHED"]
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(finished) == 2 and len(failed) == 1
    assert failed[0].data.params["gems.tau"] == "-1.0" and "gems.tau" in failed[0].data.tags["gems.error"]
    for child in finished:
        assert child.data.metrics["unified"] > 0 and "val/rec/full/ndcg_at_10" in child.data.metrics
        assert len(client.get_metric_history(child.info.run_id, "train/loss")) >= 2  # per-step metrics
        plots = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
        assert "plots/training_dynamics.png" in plots

    artifacts = {a.path for d in ("config", "data", "sweep", "evaluation")
                 for a in client.list_artifacts(parent.info.run_id, d)}
    assert {"config/resolved_config.json", "data/manifest.json", "data/quarantine_summary.json",
            "sweep/search_vs_rec.png", "sweep/trials.json", "evaluation/test_top_k.parquet"} <= artifacts
    datasets = {d.dataset.name for d in parent.inputs.dataset_inputs}
    assert datasets == {"prompts-train", "prompts-val", "prompts-test"}
    assert parent.data.metrics["test/unified"] >= 0

    champion = client.get_model_version_by_alias("gems-sr", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["gems.watermark"]
    assert champion.tags["test.unified"] == f"{parent.data.metrics['test/unified']:.6g}"
    assert champion.tags["gems.param.gems.tau"] in {"1.0", "2.0"}

    # The champion, loaded from the registry in a fresh process, ranks the test examples as evaluated.
    cfg = load_config("tiny", [f"state_dir={state}", "eval.max_examples=8"])
    test = subsample_per_task(read_split(cfg.resolve(cfg.data.output_dir), "test"), cfg.eval.max_examples,
                              cfg.data.seed)
    evaluated = pl.read_parquet(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="evaluation/test_top_k.parquet"))
    joined = test.join(evaluated.select("example_id", "top_item_ids"), on="example_id")
    # evaluation keeps a rec target ranked even when it is in the history; serving has no target
    comparable = joined.filter((pl.col("task") == "search")
                               | ~pl.col("history_item_ids").list.contains(pl.col("target_item_id")))
    assert comparable.height >= 8
    requests = tmp_path / "requests.json"
    comparable.select("task", "history_item_ids", "query").to_pandas().to_json(requests, orient="records")
    script = ("import json,sys,mlflow,pandas as pd; mlflow.set_tracking_uri(sys.argv[1]); "
              "m=mlflow.pyfunc.load_model('models:/gems-sr@champion'); "
              "out=m.predict(pd.read_json(sys.argv[2], orient='records'), params={'top_k': 10}); "
              "print(json.dumps(out['item_ids'].tolist()))")
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    fresh = subprocess.run([sys.executable, "-c", script, uri, str(requests)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300, env=clean_env)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    served = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert served == comparable["top_item_ids"].to_list()
