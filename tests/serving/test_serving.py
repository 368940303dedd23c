"""The served model ranks exactly as evaluation does, also after registry + load in a fresh process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import polars as pl
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.pyfunc import PythonModelContext
from servers import wait_until_up
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gems.config import PROJECT_ROOT
from gems.evaluate import evaluate_model
from gems.model import add_item_tokens
from gems.prompts import format_prompt
from serving.ranker import (
    ITEMS_ARTIFACT,
    MODEL_ARTIFACT,
    SETTINGS_ARTIFACT,
    Catalog,
    GemsRanker,
    ServingSettings,
    build_prompts,
    load_ranker_parts,
    rank_requests,
    write_settings,
)
from tune.config import JobConfig, load_config
from tune.registry.models import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    RegistryError,
    find_versions,
    get_champion,
    get_version,
    log_ranker,
    metric_tags,
    promote,
    register_challenger,
    register_version,
    servable_model_dir,
)

K = 5


def _requests(item_ids: list[str]) -> pd.DataFrame:
    """Rec and search rows: long and empty histories, a long query, targets outside the history."""
    rows = [("rec", item_ids[:7], None, item_ids[12]), ("rec", item_ids[3:5], None, item_ids[0]),
            ("search", item_ids[8:10], "laser printer toner " * 30, item_ids[1]),
            ("search", [], "running shoes", item_ids[5]), ("rec", [], None, item_ids[9]),
            ("search", item_ids[14:19], "green tea", item_ids[10]),
            ("rec", item_ids[10:16], None, item_ids[2])]
    return pd.DataFrame({"example_id": [f"e{i}" for i in range(len(rows))], "task": [r[0] for r in rows],
                         "history_item_ids": [r[1] for r in rows], "query": [r[2] for r in rows],
                         "target_item_id": [r[3] for r in rows]})


@pytest.fixture
def served(tiny_cfg: JobConfig, tiny_model_and_tokenizer: tuple[PreTrainedModel, PreTrainedTokenizerBase],
           tiny_items: list[tuple[str, str]], tmp_path: Path) -> tuple[JobConfig, Path, Path]:
    """A 'checkpoint' (HF model dir with item tokens) and its items table, like training writes."""
    cfg = load_config("tiny", [f"state_dir={tmp_path / 'state'}", "data.history_len=4",
                               "data.query_max_chars=40", f"eval.batch_size={3}"])
    model, tokenizer = tiny_model_and_tokenizer
    add_item_tokens(model, tokenizer, tiny_items)
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint / "model", safe_serialization=True)
    tokenizer.save_pretrained(checkpoint / "model")
    items = tmp_path / "items.parquet"
    pl.DataFrame({"item_id": [i for i, _ in tiny_items],
                  "title": [t for _, t in tiny_items]}).write_parquet(items)
    return cfg, checkpoint, items


def _evaluated_top_k(cfg: JobConfig, checkpoint: Path, items: Path, requests: pd.DataFrame) -> pl.DataFrame:
    """What evaluation ranks for the same examples, from the prompts preprocessing would write."""
    model, tokenizer, catalog, token_ids = load_ranker_parts(checkpoint / "model", items)
    settings = ServingSettings.from_config(cfg, cfg.mlflow.top_k)
    # shards hold the newest history_len items of a history (what the prompt shows)
    examples = pl.from_pandas(requests).with_columns(
        pl.Series("prompt", build_prompts(requests, catalog, settings)),
        pl.col("history_item_ids").list.tail(settings.history_len))
    result = evaluate_model(model, tokenizer, examples, catalog.item_ids, token_ids,
                            max_len=cfg.train.max_seq_len, batch_size=cfg.eval.batch_size,
                            mask_history_rec=True, top_k=K, progress=False)
    assert result.top_k is not None
    return result.top_k


def test_prompts_are_the_preprocessing_prompts(served: tuple[JobConfig, Path, Path]) -> None:
    cfg, _, items = served
    catalog = Catalog.from_parquet(items)
    requests = _requests(catalog.item_ids)
    prompts = build_prompts(requests, catalog, ServingSettings.from_config(cfg, cfg.mlflow.top_k))
    first = requests.iloc[0]
    last4 = first["history_item_ids"][-4:]  # history_len = 4: the newest four, oldest first
    assert prompts[0] == format_prompt("rec", [(i, catalog.titles[i]) for i in last4], None,
                                       cfg.data.title_max_words)
    assert prompts[2].endswith("Query: laser printer toner laser printer toner. Clicked item:")  # 40 chars
    assert prompts[4] == "[rec] History: none. Next item:"


def test_bad_requests_are_named(served: tuple[JobConfig, Path, Path]) -> None:
    cfg, _, items = served
    catalog, settings = Catalog.from_parquet(items), ServingSettings.from_config(cfg, cfg.mlflow.top_k)
    with pytest.raises(ValueError, match="task must be"):
        build_prompts(pd.DataFrame({"task": ["ads"], "history_item_ids": [[]]}), catalog, settings)
    with pytest.raises(ValueError, match="not in the catalog: \\['nope'\\]"):
        build_prompts(pd.DataFrame({"task": ["rec"], "history_item_ids": [["nope"]]}), catalog, settings)
    with pytest.raises(ValueError, match="non-empty query"):
        build_prompts(pd.DataFrame({"task": ["search"], "history_item_ids": [[]], "query": [None]}), catalog,
                      settings)


def test_ranking_equals_evaluation(served: tuple[JobConfig, Path, Path]) -> None:
    cfg, checkpoint, items = served
    model, tokenizer, catalog, token_ids = load_ranker_parts(checkpoint / "model", items)
    requests = _requests(catalog.item_ids)
    settings = ServingSettings.from_config(cfg, cfg.mlflow.top_k)
    ranked = rank_requests(model, tokenizer, token_ids, requests, catalog, settings, K)
    expected = _evaluated_top_k(cfg, checkpoint, items, requests)
    assert ranked["item_ids"].tolist() == expected["top_item_ids"].to_list()
    assert ranked["scores"].tolist() == expected["top_scores"].to_list()
    for task, history, top in zip(requests["task"], requests["history_item_ids"], ranked["item_ids"],
                                  strict=True):
        assert len(top) == K and len(set(top)) == K
        if task == "rec":
            assert not set(top) & set(history[-4:]), "rec must not return items already in the history"


def test_fused_search_ranking_equals_the_fused_evaluation(served: tuple[JobConfig, Path, Path]) -> None:
    """bm25_weight > 0: search rows rank as gems.lexical_fusion scores them; rec rows as before."""
    from gems.evaluate import evaluate_scorer, model_scorer
    from gems.floors import BM25Floor
    from gems.lexical_fusion import fused_scorer

    cfg, checkpoint, items = served
    model, tokenizer, catalog, token_ids = load_ranker_parts(checkpoint / "model", items)
    requests = _requests(catalog.item_ids)
    plain = ServingSettings.from_config(cfg, cfg.mlflow.top_k)
    fused = ServingSettings.from_config(cfg, cfg.mlflow.top_k, bm25_weight=0.4)
    ranked = rank_requests(model, tokenizer, token_ids, requests, catalog, fused, K)
    alone = rank_requests(model, tokenizer, token_ids, requests, catalog, plain, K)
    examples = pl.from_pandas(requests).with_columns(
        pl.Series("prompt", build_prompts(requests, catalog, fused)),
        pl.Series("query", [q[:cfg.data.query_max_chars] if isinstance(q, str) else None
                            for q in requests["query"]], dtype=pl.String),
        pl.col("history_item_ids").list.tail(fused.history_len))
    model_alone = model_scorer(model, tokenizer, token_ids, cfg.train.max_seq_len, cfg.eval.batch_size)
    scorer = fused_scorer(model_alone, BM25Floor.fit(pl.read_parquet(items), catalog.item_ids), 0.4)
    expected = evaluate_scorer(scorer, examples, catalog.item_ids, batch_size=cfg.eval.batch_size, top_k=K,
                               progress=False).top_k
    assert expected is not None
    assert ranked["item_ids"].tolist() == expected["top_item_ids"].to_list()
    torch.testing.assert_close(torch.tensor(ranked["scores"].tolist()),
                               torch.tensor(expected["top_scores"].to_list()))
    is_rec = (requests["task"] == "rec").tolist()
    assert [r for r, rec in zip(ranked["item_ids"], is_rec, strict=True) if rec] == \
        [r for r, rec in zip(alone["item_ids"], is_rec, strict=True) if rec]
    pairs = zip(ranked["item_ids"], alone["item_ids"], is_rec, strict=True)
    assert any(a != b for a, b, rec in pairs if not rec), "the query's words must change some search ranking"
    pyfunc = _ranker(checkpoint, items, cfg, bm25_weight=0.4).predict(None, requests.drop(
        columns=["example_id", "target_item_id"]), params={"top_k": K})
    assert pyfunc["item_ids"].tolist() == ranked["item_ids"].tolist()


def test_serving_settings_without_a_fusion_weight_load_and_bad_weights_are_refused(tmp_path: Path) -> None:
    cfg = load_config("tiny", [f"state_dir={tmp_path}"])
    saved = json.loads(json.dumps(ServingSettings.from_config(cfg, 5).__dict__))
    saved.pop("bm25_weight")  # a version registered before search fusion existed
    assert ServingSettings(**saved).bm25_weight == 0.0
    with pytest.raises(ValueError, match=r"bm25_weight must lie in \[0, 1\], got 1.5"):
        ServingSettings.from_config(cfg, 5, bm25_weight=1.5)


def test_adapter_and_non_model_dirs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    with pytest.raises(RegistryError, match="LoRA adapter"):
        servable_model_dir(tmp_path)
    with pytest.raises(RegistryError, match="not a Hugging Face model dir"):
        servable_model_dir(tmp_path / "elsewhere")
    (tmp_path / "dpmoe" / "model").mkdir(parents=True)
    (tmp_path / "dpmoe" / "model" / "dpmoe_adapter.safetensors").write_bytes(b"")
    with pytest.raises(RegistryError, match="DPMoE adapter"):
        servable_model_dir(tmp_path / "dpmoe")


LOAD_AND_PREDICT = """
import json, sys
sys.modules["ray"] = None  # `import ray` raises ImportError: the served model must not need Ray
import mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
requests = pd.read_json(sys.argv[3], orient="records")
out = model.predict(requests[["task", "history_item_ids", "query"]], params={"top_k": int(sys.argv[4])})
assert sys.modules["ray"] is None and not any(m.startswith("ray.") for m in sys.modules)
assert not any(m == "tune" or m.startswith("tune.") for m in sys.modules), "serving imported tune"
print(json.dumps({"item_ids": out["item_ids"].tolist(), "scores": out["scores"].tolist()}))
"""


def _logged_ranker(served: tuple[JobConfig, Path, Path], tmp_path: Path) -> tuple[str, ModelInfo]:
    """The ranker logged to a fresh SQLite store under tmp_path: (tracking URI, its ModelInfo)."""
    cfg, checkpoint, items = served
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("serving", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        return uri, log_ranker(checkpoint, items, cfg)


@pytest.mark.slow
def test_registered_champion_loads_in_a_fresh_process_and_ranks_like_evaluation(
        served: tuple[JobConfig, Path, Path], tmp_path: Path) -> None:
    cfg, checkpoint, items = served
    uri, info = _logged_ranker(served, tmp_path)
    name = "gems-sr-test"
    assert get_champion(name) is None  # no model registered yet: None, not an exception
    tags = {"gems.watermark": "2026-01-01", **metric_tags({"unified": 0.25})}
    v1 = register_version(info.model_uri, name, tags, "first", alias=CHAMPION)
    champion = get_champion(name)
    assert champion is not None and champion.version == v1.version and champion.watermark == "2026-01-01"
    assert champion.metric("test.unified") == 0.25 and champion.description == "first"

    catalog = Catalog.from_parquet(items)
    requests = _requests(catalog.item_ids)
    request_file = tmp_path / "requests.json"
    requests.to_json(request_file, orient="records")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, uri, f"models:/{name}@{CHAMPION}",
                          str(request_file), str(K)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served_top = json.loads(out.stdout.strip().splitlines()[-1])
    expected = _evaluated_top_k(cfg, checkpoint, items, requests)
    assert served_top["item_ids"] == expected["top_item_ids"].to_list()
    assert torch.allclose(torch.tensor(served_top["scores"]), torch.tensor(expected["top_scores"].to_list()))

    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{v1.version}"))
    # only the library and the serving package travel with the model: no Ray code
    assert {p.name for p in (model_dir / "code").iterdir()} == {"gems", "serving"}

    v2 = register_challenger(info.model_uri, name, {"gems.watermark": "2026-01-02"}, "second")
    assert get_version(name, CHALLENGER).version == v2.version
    assert get_champion(name).version == v1.version  # registering never moves the champion
    old = promote(name, v2.version)
    assert old is not None and old.version == v1.version
    assert get_champion(name).version == v2.version and get_version(name, PREVIOUS).version == v1.version
    assert get_version(name, CHALLENGER) is None
    assert [v.version for v in find_versions(name, "gems.watermark", "2026-01-02")] == [v2.version]
    assert MlflowClient().get_model_version(name, v1.version).tags["test.unified"] == "0.25"


BAD_ROWS = [  # (task, history, query, top_k) -> what the response must say
    (("ads", [], None, None), "row 0: task must be 'search' or 'rec', got 'ads'"),
    (("rec", ["nope"], None, None), "row 0: history items not in the catalog: ['nope']"),
    (("search", [], "  ", None), "row 0: a search request needs a non-empty query"),
    (("rec", [], None, -3), "top_k must be from 1 to 20 (the catalog size), got -3"),
    (("rec", [], None, 0), "top_k must be from 1 to 20 (the catalog size), got 0"),
    (("rec", [], None, 21), "top_k must be from 1 to 20 (the catalog size), got 21"),
]


def _ranker(checkpoint: Path, items: Path, cfg: JobConfig, bm25_weight: float | None = None) -> GemsRanker:
    """The pyfunc class as MLflow loads it (load_context with the logged artifacts)."""
    settings = write_settings(ServingSettings.from_config(cfg, cfg.mlflow.top_k, bm25_weight),
                              checkpoint / "serving.json")
    ranker = GemsRanker()
    ranker.load_context(PythonModelContext(artifacts={MODEL_ARTIFACT: str(checkpoint / "model"),
                                                      ITEMS_ARTIFACT: str(items),
                                                      SETTINGS_ARTIFACT: str(settings)}, model_config={}))
    return ranker


@pytest.mark.parametrize(("row", "message"), BAD_ROWS)
def test_pyfunc_refuses_a_bad_request_with_a_named_invalid_parameter(
        served: tuple[JobConfig, Path, Path], row: tuple, message: str) -> None:
    cfg, checkpoint, items = served
    task, history, query, top_k = row
    frame = pd.DataFrame({"task": [task], "history_item_ids": [history], "query": [query]})
    with pytest.raises(MlflowException) as err:
        _ranker(checkpoint, items, cfg).predict(None, frame, params={"top_k": top_k})
    assert err.value.message == message and err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.get_http_status_code() == 400 and "stack_trace" not in err.value.serialize_as_json()


def test_pyfunc_top_k_is_the_count_returned(served: tuple[JobConfig, Path, Path]) -> None:
    cfg, checkpoint, items = served
    frame = pd.DataFrame({"task": ["rec"], "history_item_ids": [[]], "query": [None]})
    ranker = _ranker(checkpoint, items, cfg)
    for k, expected in ((1, 1), (20, 20), (None, cfg.mlflow.top_k)):
        assert len(ranker.predict(None, frame, params={"top_k": k})["item_ids"][0]) == expected


def test_pyfunc_turns_an_internal_failure_into_a_message_without_traceback(
        served: tuple[JobConfig, Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    cfg, checkpoint, items = served
    ranker = _ranker(checkpoint, items, cfg)
    ranker.item_token_ids = torch.full_like(ranker.item_token_ids, 10**9)  # a broken model: no such rows
    frame = pd.DataFrame({"task": ["rec"], "history_item_ids": [[]], "query": [None]})
    with pytest.raises(MlflowException) as err:
        ranker.predict(None, frame)
    assert err.value.error_code == "INTERNAL_ERROR" and err.value.get_http_status_code() == 500
    assert err.value.message.startswith("ranking failed (") and "the model server's log" in err.value.message
    assert "Traceback" not in err.value.serialize_as_json() and "Traceback" in caplog.text


def _post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_served_model_answers_bad_requests_with_400_and_no_traceback(
        served: tuple[JobConfig, Path, Path], tmp_path: Path) -> None:
    """`mlflow models serve` on the logged ranker: bad rows get 400 with the pyfunc's sentence only."""
    cfg = served[0]
    uri, info = _logged_ranker(served, tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent  # the server runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", info.model_uri,
               "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port)]
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_up(f"{base}/ping", proc, log_path)
        for (task, history, query, top_k), message in BAD_ROWS:
            payload = {"dataframe_records": [{"task": task, "history_item_ids": history, "query": query}]}
            if top_k is not None:
                payload["params"] = {"top_k": top_k}
            status, body = _post(f"{base}/invocations", payload)
            assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE", body
            assert body["message"].endswith(message) and "stack_trace" not in body, body
            assert "Traceback" not in json.dumps(body) and str(PROJECT_ROOT) not in json.dumps(body)
        rec = {"task": "rec", "history_item_ids": []}
        for payload in ({"dataframe_records": [{"history_item_ids": ["1"]}]},  # MLflow's schema checks
                        {"dataframe_records": [rec], "params": {"top_k": "x"}}):
            status, body = _post(f"{base}/invocations", payload)
            assert status == 400 and "stack_trace" not in body and "Traceback" not in json.dumps(body), body
        ok = {"dataframe_records": [{"task": "rec", "history_item_ids": ["1"], "query": None}]}
        status, body = _post(f"{base}/invocations", ok)
        assert status == 200 and len(body["predictions"][0]["item_ids"]) == cfg.mlflow.top_k
        status, body = _post(f"{base}/invocations", ok | {"params": {"top_k": 3}})
        assert status == 200 and len(body["predictions"][0]["item_ids"]) == 3
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
