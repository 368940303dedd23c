"""Compile the decoder layers, the part of a step that is many small ops around each matmul.

Only the layers are compiled, in place (``nn.Module.compile``): parameter names, ``state_dict``
keys, checkpoints, DDP wrapping and GEMS's reading of ``.grad`` stay exactly as without it, and
the embedding, head and losses (which differ per method and task) stay eager. Shapes are marked
dynamic, so the bucketed batches' many lengths do not each trigger a compilation.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of any Hugging Face decoder (wrapped by peft or not), in order."""
    return [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]


def compile_decoder_layers(model: nn.Module) -> int:
    """``torch.compile`` every decoder layer of ``model`` in place; returns how many were compiled."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"train.compile: found no decoder layers in {type(model).__name__} "
                         "(modules whose class name ends in 'DecoderLayer')")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)
