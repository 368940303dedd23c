"""Scheduling and cluster manifests: they parse, carry what their controllers require (schedule,
entrypoint, submission id, GPU resources), agree with each other, and the commands they run work
as written (in dry-run mode here; tests/e2e/test_nightly.py submits for real to a local Ray head).
"""

from __future__ import annotations

import copy
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from gems.config import PROJECT_ROOT
from tune.config import load_config

INFRA = PROJECT_ROOT / "infra"
K8S = INFRA / "k8s"
SUBMIT = INFRA / "nightly_submit.sh"
SCHEDULE = "30 2 * * *"  # 02:30 UTC, everywhere
MODEL_OVERRIDE = "model.name_or_path="
MAX_RAYJOB_NAME = 47  # KubeRay: RayCluster name limit (53) minus the 6 characters it appends
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
CRON_FIELDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))


def _docs(name: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d is not None]
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), doc
    return docs


def _one(name: str, kind: str) -> dict[str, Any]:
    found = [d for d in _docs(name) if d["kind"] == kind]
    assert len(found) == 1, f"{name}: expected one {kind}"
    return found[0]


def _valid_cron(expr: str) -> bool:
    fields = expr.split()
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if base == "*":
                continue
            bounds = base.split("-")
            if len(bounds) > 2 or not all(b.isdigit() and low <= int(b) <= high for b in bounds):
                return False
    return True


def _nightly_rayjob_template(night: str) -> dict[str, Any]:
    """The RayJob the plain CronJob creates on ``night``, rendered by the CronJob's own sed line."""
    config_map = _one("cronjob-nightly.yaml", "ConfigMap")
    script = _one("cronjob-nightly.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]["args"][0]
    sed = next(line for line in script.splitlines() if line.startswith("sed "))
    rendered = subprocess.run(
        ["bash", "-c", sed.replace("/templates/rayjob.yaml", "/dev/stdin").replace(" > /tmp/rayjob.yaml", "")],  # noqa: E501
        input=config_map["data"]["rayjob.yaml"], env={**os.environ, "NIGHT": night},
        capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(rendered)


def _cluster_specs() -> dict[str, dict[str, Any]]:
    return {
        "raycluster-gpu.yaml": _one("raycluster-gpu.yaml", "RayCluster")["spec"],
        "rayjob-full-gpu.yaml": _one("rayjob-full-gpu.yaml", "RayJob")["spec"]["rayClusterSpec"],
        "raycronjob-nightly.yaml": _one("raycronjob-nightly.yaml", "RayCronJob")["spec"]["jobTemplate"][
            "rayClusterSpec"],
        "cronjob-nightly.yaml": _nightly_rayjob_template("2025-01-02")["spec"]["rayClusterSpec"],
    }


def _entrypoints() -> dict[str, str]:
    return {
        "rayjob-full-gpu.yaml": _one("rayjob-full-gpu.yaml", "RayJob")["spec"]["entrypoint"],
        "raycronjob-nightly.yaml": _one("raycronjob-nightly.yaml", "RayCronJob")["spec"]["jobTemplate"][
            "entrypoint"],
        "cronjob-nightly.yaml": _nightly_rayjob_template("2025-01-02")["spec"]["entrypoint"],
    }


# ----------------------------------------------------------------------------- Kubernetes


def test_gpu_cluster_has_gpu_workers_and_a_cpu_head() -> None:
    spec = _one("raycluster-gpu.yaml", "RayCluster")["spec"]
    assert _one("raycluster-gpu.yaml", "RayCluster")["apiVersion"] == "ray.io/v1"
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["containers"][0]["image"]
    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        container = group["template"]["spec"]["containers"][0]
        gpus = container["resources"]["limits"]["nvidia.com/gpu"]
        assert int(gpus) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        assert group["rayStartParams"]["num-gpus"] == gpus
    cfg = load_config("gpu-qwen2.5-3b")
    total_gpus = sum(g["replicas"] * int(g["rayStartParams"]["num-gpus"]) for g in groups)
    assert cfg.train.use_gpu and cfg.train.num_workers <= total_gpus


def test_every_manifest_runs_the_same_cluster() -> None:
    specs = _cluster_specs()
    reference = specs.pop("raycluster-gpu.yaml")
    for name, spec in specs.items():
        assert spec == reference, f"{name}: rayClusterSpec differs from raycluster-gpu.yaml"


@pytest.mark.parametrize("manifest", ["rayjob-full-gpu.yaml", "raycronjob-nightly.yaml",
                                      "cronjob-nightly.yaml"])
def test_entrypoint_config_loads_and_its_paths_are_mounted(manifest: str) -> None:
    argv = shlex.split(_entrypoints()[manifest])
    assert argv[0] == "python" and argv[1].startswith("/app/pipelines/")
    script = Path(argv[1].replace("/app", str(PROJECT_ROOT), 1))
    assert script.name in ("full.py", "nightly.py")
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    model = [o for o in overrides if o.startswith(MODEL_OVERRIDE)]
    assert model, f"{manifest}: the GPU config needs --set {MODEL_OVERRIDE}<backbone dir>"
    cfg = load_config(config, [o for o in overrides if not o.startswith(MODEL_OVERRIDE)])
    spec = _cluster_specs()[manifest]
    containers = [spec["headGroupSpec"]["template"]["spec"]["containers"][0]] + [
        g["template"]["spec"]["containers"][0] for g in spec["workerGroupSpecs"]]
    for container in containers:
        mounts = [m["mountPath"] for m in container["volumeMounts"]]
        for path in (model[0][len(MODEL_OVERRIDE):], cfg.state_dir, cfg.train.storage_path,
                     cfg.data.path or "", cfg.data.items_path or ""):
            assert any(path.startswith(m + "/") for m in mounts), f"{manifest}: {path} is not on a volume"


def test_rayjobs_clean_up_and_retry_once() -> None:
    jobs = {"full": _one("rayjob-full-gpu.yaml", "RayJob")["spec"],
            "raycron": _one("raycronjob-nightly.yaml", "RayCronJob")["spec"]["jobTemplate"],
            "cron": _nightly_rayjob_template("2025-01-02")["spec"]}
    for name, job in jobs.items():
        assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0, name
        assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] == 1, name
        assert job["submissionMode"] == "K8sJobMode", name


def test_raycronjob_carries_schedule_and_job_template() -> None:
    cron = _one("raycronjob-nightly.yaml", "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert cron["spec"]["schedule"] == SCHEDULE and _valid_cron(cron["spec"]["schedule"])
    assert cron["spec"]["suspend"] is False
    assert "pipelines/nightly.py" in cron["spec"]["jobTemplate"]["entrypoint"]
    name = cron["metadata"]["name"]
    assert DNS1035.match(name) and len(name) + len("-abcde") <= MAX_RAYJOB_NAME


def test_plain_cronjob_creates_one_rayjob_per_night() -> None:
    cron = _one("cronjob-nightly.yaml", "CronJob")
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["schedule"] == SCHEDULE
    assert cron["spec"]["timeZone"] == "Etc/UTC" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    role = _one("cronjob-nightly.yaml", "Role")
    binding = _one("cronjob-nightly.yaml", "RoleBinding")
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    assert _one("cronjob-nightly.yaml", "ServiceAccount")["metadata"]["name"] == pod["serviceAccountName"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])

    job = _nightly_rayjob_template("2025-01-02")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    assert job["metadata"]["name"] == "gems-nightly-2025-01-02"
    assert DNS1035.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= MAX_RAYJOB_NAME
    assert job["spec"]["jobId"] == "nightly-2025-01-02"
    assert all(isinstance(v, str) for v in job["metadata"]["labels"].values())
    # Same job as the RayCronJob's template, plus the per-night submission id.
    without_id = copy.deepcopy(job["spec"])
    del without_id["jobId"]
    assert without_id == _one("raycronjob-nightly.yaml", "RayCronJob")["spec"]["jobTemplate"]


def test_cronjob_script_treats_a_second_trigger_as_done(tmp_path: Path) -> None:
    """The submitter pod's script, run twice against a stand-in for the Kubernetes API (no
    cluster here): the first run creates the night's RayJob, the second finds it and succeeds."""
    pod = _one("cronjob-nightly.yaml", "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    script = pod["containers"][0]["args"][0]
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "rayjob.yaml").write_text(_one("cronjob-nightly.yaml", "ConfigMap")["data"]["rayjob.yaml"])
    store = tmp_path / "api"
    store.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(f"""#!/usr/bin/env bash
# create -f FILE: fails when a RayJob of that name exists; get rayjob NAME: succeeds if it exists
if [[ "$1" == create ]]; then
  name=$({sys.executable} -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["metadata"]["name"])' "$3")
  [[ -e "{store}/$name" ]] && {{ echo "AlreadyExists" >&2; exit 1; }}
  cp "$3" "{store}/$name"
elif [[ "$1" == get ]]; then
  [[ -e "{store}/$3" ]]
fi
""")  # noqa: E501
    kubectl.chmod(0o755)
    script = script.replace("/templates/", f"{templates}/")
    script = script.replace("/tmp/rayjob.yaml", f"{tmp_path}/rayjob.yaml")
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    first = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    second = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True)
    night = datetime.now(UTC).date().isoformat()
    assert first.returncode == 0 and "created RayJob" in first.stdout, first.stderr
    assert second.returncode == 0 and "already exists" in second.stdout, second.stderr
    created = yaml.safe_load((store / f"gems-nightly-{night}").read_text())
    assert created["spec"]["jobId"] == f"nightly-{night}"


# ------------------------------------------------------------------------- cron and systemd


def _cron_entry() -> tuple[dict[str, str], str, str, str]:
    env, lines = {}, []
    for line in (INFRA / "cron" / "nightly.cron").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if sep and re.fullmatch(r"[A-Z_]+", key):
            env[key] = value
        else:
            lines.append(line)
    assert len(lines) == 1, lines
    fields = lines[0].split(None, 6)
    return env, " ".join(fields[:5]), fields[5], fields[6]


def _dry_run(command: list[str] | str, env: dict[str, str], tmp_path: Path, shell: bool = False) -> str:
    run_env = {**env, "PATH": os.environ["PATH"], "HOME": str(tmp_path), "GEMS_SUBMIT_DRY_RUN": "1"}
    done = subprocess.run(["bash", "-c", command] if shell else command, env=run_env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cron_line_runs_as_written(tmp_path: Path) -> None:
    env, schedule, user, command = _cron_entry()
    assert schedule == SCHEDULE and _valid_cron(schedule) and user
    assert "%" not in command, "cron turns % into a newline: keep date formats inside the script"
    env["GEMS_REPO"] = str(PROJECT_ROOT)  # the checkout on this machine instead of /opt/gems-sr
    _dry_run(command, env, tmp_path, shell=True)
    submitted = shlex.split((tmp_path / "gems-nightly.log").read_text())
    night = datetime.now(UTC).date().isoformat()
    assert submitted[submitted.index("--submission-id") + 1] == f"nightly-{night}"
    assert submitted[submitted.index("--working-dir") + 1] == str(PROJECT_ROOT)
    assert submitted[submitted.index("--address") + 1] == env["RAY_ADDRESS"]
    entry = submitted[submitted.index("--") + 1:]
    assert entry[1:4] == ["pipelines/nightly.py", "--config", env["GEMS_NIGHTLY_CONFIG"]]
    assert (PROJECT_ROOT / entry[1]).exists()
    load_config(env["GEMS_NIGHTLY_CONFIG"])


def test_submission_ids(tmp_path: Path) -> None:
    env = {"GEMS_NIGHT": "2025-01-02", "GEMS_REPO": str(PROJECT_ROOT)}
    out = shlex.split(_dry_run([str(SUBMIT), "--", "--set", "train.max_steps=2"], env, tmp_path))
    assert out[out.index("--submission-id") + 1] == "nightly-2025-01-02"
    assert out[-2:] == ["--set", "train.max_steps=2"]
    retry = shlex.split(_dry_run([str(SUBMIT), "--retry"], env, tmp_path))
    assert re.fullmatch(r"nightly-2025-01-02-retry-\d{6}", retry[retry.index("--submission-id") + 1])


def _unit(name: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in (INFRA / "systemd" / name).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_systemd_timer_matches_the_cron_schedule(tmp_path: Path) -> None:
    timer = _unit("gems-nightly.timer")
    assert timer["OnCalendar"] == ["*-*-* 02:30:00 UTC"] and timer["Unit"] == ["gems-nightly.service"]
    assert timer["Persistent"] == ["true"] and timer["WantedBy"] == ["timers.target"]
    service = _unit("gems-nightly.service")
    assert service["Type"] == ["oneshot"]
    env = dict(e.split("=", 1) for e in service["Environment"])
    env["GEMS_REPO"] = str(PROJECT_ROOT)
    exec_start = service["ExecStart"][0].replace("/opt/gems-sr", str(PROJECT_ROOT))
    out = shlex.split(_dry_run(shlex.split(exec_start), env, tmp_path))
    assert out[out.index("--config") + 1] == env["GEMS_NIGHTLY_CONFIG"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd's own checker on the units (paths pointed at this checkout, user = this user)."""
    for name in ("gems-nightly.service", "gems-nightly.timer"):
        text = (INFRA / "systemd" / name).read_text().replace("/opt/gems-sr", str(PROJECT_ROOT))
        user = pwd.getpwuid(os.getuid()).pw_name
        (tmp_path / name).write_text(re.sub(r"^User=.*$", f"User={user}", text, flags=re.M))
    calendar = subprocess.run(["systemd-analyze", "calendar", "*-*-* 02:30:00 UTC"], capture_output=True,
                              text=True, timeout=30)
    assert calendar.returncode == 0, calendar.stderr
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "gems-nightly.service"),
                           str(tmp_path / "gems-nightly.timer")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_cron_validator_rejects_bad_schedules() -> None:
    assert _valid_cron("*/15 0-6 * * 1,3,5")
    for bad in ("30 2 * *", "61 2 * * *", "30 24 * * *", "30 2 * * * *", "*/0 * * * *", "a b c d e"):
        assert not _valid_cron(bad), bad
