"""The sweep on real Ray Tune + Optuna + MLflow, with cheap stand-in trials (tests/sweep_driver.py).

One scenario, two driver runs (each a fresh local Ray): a sweep whose first point is invalid is
interrupted with SIGINT (Ctrl-C) after a trial finished, then the same command resumes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from tune.config import load_config
from tune.registry.run_params import config_params
from tune.sweep.parent_run import SWEEP_TAG
from tune.sweep.trial_runs import TRIAL_ID_TAG
from tune.sweep.tuner import max_concurrent_trials, study_storage_url

DRIVER = Path(__file__).resolve().parents[2] / "sweep_driver.py"  # tests/sweep_driver.py
ROOT = DRIVER.parent.parent
NUM_SAMPLES = 3
SETTINGS = [f"tune.num_samples={NUM_SAMPLES}", "tune.max_concurrent=1",
            # 3 evaluations per trial (6 steps, every 2) with ASHA's grace period at 3: no early
            # stopping, so every valid trial runs to its end and is easy to account for
            "train.eval_every=2", "tune.asha_grace_period=3",
            # a space reaching into invalid values (tau must be > 0) and a point there
            "tune.space={gems.tau: {low: -1.0, high: 3.0}}", "tune.points_to_evaluate=[{gems.tau: -1.0}]"]


def _driver(state: Path, markers: Path, uri: str) -> subprocess.Popen:
    args = [sys.executable, str(DRIVER), str(state), str(markers), uri]
    for s in SETTINGS:
        args += ["--set", s]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_concurrency_leaves_cpus_for_data() -> None:
    cfg = load_config("demo")
    assert max_concurrent_trials(cfg, cluster_cpus=2) == 1  # this machine: one trial at a time
    assert max_concurrent_trials(cfg, cluster_cpus=9) == 8
    assert max_concurrent_trials(load_config("demo", ["train.num_workers=2"]), cluster_cpus=2) == 1
    assert max_concurrent_trials(load_config("demo", ["tune.max_concurrent=3"]), cluster_cpus=2) == 3


@pytest.mark.slow
def test_failed_trial_is_recorded_and_interrupted_sweep_resumes(tmp_path: Path) -> None:
    state, markers = tmp_path / "state", tmp_path / "markers"
    markers.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = _driver(state, markers, uri)
    deadline = time.monotonic() + 240
    while not list(markers.glob("done-*")) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert first.poll() is None, f"driver ended early:\n{first.communicate()[1][-3000:]}"
    time.sleep(0.5)
    first.send_signal(signal.SIGINT)  # what Ctrl-C does
    _, err = first.communicate(timeout=180)
    assert first.returncode == 3, f"expected exit 3 (interrupted), got {first.returncode}:\n{err[-3000:]}"
    done_before = {p.name.removeprefix("done-") for p in markers.glob("done-*")}
    assert done_before

    second = _driver(state, markers, uri)
    out, err = second.communicate(timeout=400)
    assert second.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["restored"] is True

    starts: dict[str, int] = {}
    for p in markers.glob("start-*"):
        trial_id = p.name.split("-")[1]
        starts[trial_id] = starts.get(trial_id, 0) + 1
    for trial_id in done_before:
        assert starts[trial_id] == 1, f"finished trial {trial_id} ran again after the resume"
    done_after = {p.name.removeprefix("done-") for p in markers.glob("done-*")}

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    parents = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                 filter_string=f"tags.`{SWEEP_TAG}` = '{summary['sweep']}'")
    assert [p.info.run_id for p in parents] == [summary["parent_run_id"]], "the resume reopens the parent"
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([parents[0].info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{summary['parent_run_id']}'")
    by_trial = {c.data.tags[TRIAL_ID_TAG]: c for c in children}
    assert len(children) == len(by_trial) == NUM_SAMPLES, "one child run per trial, no duplicates"
    assert any(c.data.params["gems.tau"] == "-1.0" for c in children), "the injected point ran"
    for trial_id, child in by_trial.items():
        if float(child.data.params["gems.tau"]) <= 0:  # invalid: failed before any work
            assert child.info.status == "FAILED", trial_id
            assert "gems.tau" in child.data.tags["gems.error"]
            assert trial_id not in starts
        else:
            assert child.info.status == "FINISHED", trial_id
            assert trial_id in done_after
            history = client.get_metric_history(child.info.run_id, "train/gate_search")
            assert [m.step for m in history] == [2, 4, 6]
            artifacts = {a.path for a in client.list_artifacts(child.info.run_id, "plots")}
            assert "plots/training_dynamics.png" in artifacts
    best = by_trial[summary["best_trial_id"]]
    finished_unified = [c.data.metrics["unified"] for c in children if c.info.status == "FINISHED"]
    assert best.data.metrics["unified"] == max(finished_unified)

    sweep_files = {a.path for a in client.list_artifacts(summary["parent_run_id"], "sweep")}
    assert {"sweep/search_vs_rec.png", "sweep/parallel_coordinates.png", "sweep/trials.json",
            "sweep/summary.json", "sweep/param_importances_unified.png"} <= sweep_files

    # every hyperparameter is a param: the parent shows the space, each trial its point, and the
    # resumed sweep logged them again without tripping over MLflow's immutable params
    cfg = load_config("tiny", [f"state_dir={state}", f"mlflow.tracking_uri={uri}", *SETTINGS])
    fixed = {k: v for k, v in config_params(cfg).items() if k != "gems.tau"}
    assert parents[0].data.params["gems.tau"].startswith("searched {")
    for run in [parents[0], *children]:
        assert {k: run.data.params.get(k) for k in fixed} == fixed, run.info.run_id
        assert not any(k.startswith("mlflow.") for k in run.data.params)
    assert {"train.lr", "gems.t_svd", "gems.k", "gems.alpha", "gems.r_search", "gems.r_rec"} <= set(fixed)

    study = optuna.load_study(study_name=summary["sweep"], storage=study_storage_url(cfg))
    n_failed = sum(c.info.status == "FAILED" for c in children)
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.FAIL) == n_failed >= 1
    assert states.count(optuna.trial.TrialState.COMPLETE) == NUM_SAMPLES - n_failed


@pytest.mark.slow
def test_sliced_bases_equal_bases_estimated_with_that_k(tmp_path: Path) -> None:
    """One estimate with the largest k serves every trial: its first k columns are the k-basis."""
    import torch

    from gems.nullspace import load_bases
    from tune.sweep.bases import bases_for_trial, largest_k, sweep_bases
    from tune.train.bases import prepare_bases

    cfg = load_config("tiny", [f"state_dir={tmp_path}", "gems.general_max_tokens=256",
                               "tune.space={gems.k: {low: 0, high: 12, integer: true}}"])
    assert largest_k(cfg) == 12
    widest = sweep_bases(cfg)
    assert widest is not None
    trial_cfg = load_config("tiny", [f"state_dir={tmp_path}", "gems.general_max_tokens=256", "gems.k=5"])
    sliced, direct = load_bases(bases_for_trial(trial_cfg, widest)), load_bases(prepare_bases(trial_cfg))
    assert sliced.keys() == direct.keys()
    for name, u in direct.items():
        assert u.shape[1] == 5
        # eigenvectors are defined up to sign: compare the projectors
        assert torch.allclose(sliced[name] @ sliced[name].T, u @ u.T, atol=1e-4), name
    assert bases_for_trial(load_config("tiny", ["gems.k=0"]), widest) is None
    with pytest.raises(ValueError, match="exceeds the 12 directions"):
        bases_for_trial(load_config("tiny", ["gems.k=13"]), widest)


@pytest.mark.parametrize("algorithm,directions", [("tpe", 1), ("nsga2", 2)])
def test_searcher_samples_the_space_under_the_limit_and_persists_the_study(
        algorithm: str, directions: int, tmp_path: Path) -> None:
    from tune.sweep.tuner import REC_NDCG, SEARCH_NDCG, UNIFIED, build_searcher

    cfg = load_config("tiny", [f"state_dir={tmp_path}", f"tune.algorithm={algorithm}", "tune.num_samples=6",
                               "tune.points_to_evaluate=[{gems.tau: 1.0, gems.r_shared: 4}]"])
    searcher = build_searcher(cfg, "study-x", max_concurrent=1)
    assert searcher.suggest("t0") == {"gems.tau": 1.0, "gems.r_shared": 4}  # the given point first
    assert searcher.suggest("t1") is None  # one trial at a time
    for i in range(6):
        trial_id = f"t{i}"
        params = searcher.suggest(trial_id) if i else {"gems.tau": 1.0, "gems.r_shared": 4}
        assert 0.3 <= params["gems.tau"] <= 3.0 and 2 <= params["gems.r_shared"] <= 8
        assert isinstance(params["gems.r_shared"], int)
        search, rec = 0.1 + 0.01 * i, 0.2 - 0.01 * i
        searcher.on_trial_complete(trial_id, result={UNIFIED: (search + rec) / 2, SEARCH_NDCG: search,
                                                     REC_NDCG: rec, "training_iteration": 1})
    study = optuna.load_study(study_name="study-x", storage=study_storage_url(cfg))
    assert len(study.directions) == directions
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 6
    assert (cfg.state_path / "optuna.db").is_file()


def test_asha_counts_evaluations_of_a_trial() -> None:
    from tune.sweep.tuner import build_scheduler, evals_per_trial

    every_10 = ["tune.eval_every=10"]
    assert evals_per_trial(load_config("demo", [*every_10, "train.max_steps=30"])) == 3
    # and always at the end
    assert evals_per_trial(load_config("demo", [*every_10, "train.max_steps=35"])) == 4
    assert evals_per_trial(load_config("tiny")) == 1  # only the final evaluation: ASHA has nothing to cut
    scheduler = build_scheduler(load_config("demo", [*every_10, "train.max_steps=30"]))
    assert scheduler._time_attr == "evals" and scheduler._max_t == 3
