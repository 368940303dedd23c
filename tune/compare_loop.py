"""Ray Train runs for the comparison: the shared trainer, with LoRA's item-token rows trainable.

``tune.worker_loop`` builds every method with ``build_method(model, cfg, lr, bases)``, without the
item token ids, so a LoRA run would keep every item embedding frozen at its title-mean
initialisation while GEMS, AdamW and GaLore train them: a comparison of adapters plus frozen item
rows against full item training. This wrapper hands the ids that ``add_item_tokens`` returned to
``build_method`` (peft ``trainable_token_indices``; see ``gems.baselines``), only when the caller did
not pass them itself, and otherwise runs the shared loop unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gems.config import Config
from tune.trainer import TrainOutcome, build_trainer


def train_loop_with_item_rows(loop_config: dict[str, Any]) -> dict[str, Any]:
    """``tune.worker_loop.train_loop_per_worker`` with item-token ids passed on to build_method."""
    import tune.worker_loop as loop
    from gems.baselines import build_method
    from gems.model import add_item_tokens

    added: dict[str, list[int]] = {}

    def add_and_remember(model: Any, tokenizer: Any, items: Any) -> list[int]:
        added["ids"] = add_item_tokens(model, tokenizer, items)
        return added["ids"]

    def build_with_items(model: Any, gems_cfg: Any, lr: float, bases: Any = None,
                         item_token_ids: Any = None, **kwargs: Any) -> Any:
        ids = item_token_ids if item_token_ids is not None else added.get("ids")
        return build_method(model, gems_cfg, lr, bases, item_token_ids=ids, **kwargs)

    loop.add_item_tokens = add_and_remember
    loop.build_method = build_with_items
    return loop.train_loop_per_worker(loop_config)


def train(cfg: Config, shard_dir: Path, bases_path: Path | None, run_name: str) -> TrainOutcome:
    """Fit one run like ``tune.trainer.run_training`` does, with the loop above."""
    trainer = build_trainer(cfg, shard_dir, bases_path, run_name)
    trainer.train_loop_per_worker = train_loop_with_item_rows
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    returned = result.return_value or {}
    history = list(returned.get("history", []))
    checkpoint = result.checkpoint
    local = Path(checkpoint.path) if checkpoint is not None and "://" not in str(checkpoint.path) else None
    last = dict(history[-1]) if history else dict(result.metrics or {})
    return TrainOutcome(checkpoint_path=local, metrics=last,
                        history=history, run_path=str(result.path),
                        precision=dict(returned.get("precision", {})),
                        parameter_digest=str(returned.get("parameter_digest", "")))
