"""The embedded SmolLM2-135M backbone: loads from the wheel, knows facts, is read back from the cache.

The cache lives under the project's state dir (the demo config's model.cache_dir), so tests and the
demo share one dequantized copy across runs: on a clean clone the first load here dequantizes the
GGUF (~20 s), later loads read safetensors.
"""

from __future__ import annotations

import json

import pytest
import torch

from gems.backbone_cache import MARKER_NAME
from gems.model import SMOLLM2_INSTALL, load_backbone_with_source, smollm2_gguf_path
from tune.config import load_config

pytestmark = pytest.mark.slow


def test_smollm2_answers_and_second_load_comes_from_the_cache() -> None:
    gguf = smollm2_gguf_path()
    assert gguf is not None, f"the embedded backbone wheel is missing: {SMOLLM2_INSTALL}"
    cfg = load_config("demo")
    cache_root = cfg.resolve(cfg.model.cache_dir)

    model, tok, first_source = load_backbone_with_source(cfg.model, cache_root)
    assert first_source in ("gguf", "cache")
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert len(tok) == 49_152 and tok.padding_side == "left" and tok.pad_token_id is not None

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    input_ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    again, _, second_source = load_backbone_with_source(cfg.model, cache_root)
    assert second_source == "cache"
    marker = json.loads((cache_root / "smollm2-135m" / MARKER_NAME).read_text())
    assert marker["source"]["gguf_file"] == gguf.name
    assert marker["source"]["gguf_bytes"] == gguf.stat().st_size
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[name]), name
