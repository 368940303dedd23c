"""The per-report progress line a training run prints (rank 0), so long runs are never silent."""

from __future__ import annotations

from tune.train.worker_loop import progress_line


def test_progress_line_names_step_losses_speed_and_val_metrics() -> None:
    line = progress_line({"step": 60, "train/loss": 6.2049, "train/loss_search": 5.2, "train/loss_rec": 7.2,
                          "train/step_time_s": 1.93, "val/search/full/ndcg_at_10": 0.1423,
                          "val/rec/full/ndcg_at_10": 0.0151, "train/lr": 2e-4}, 240)
    assert line == ("step 60/240 | loss 6.205 | search 5.2 | rec 7.2 | s/step 1.93 | "
                    "val search NDCG@10 0.1423 | val rec NDCG@10 0.0151")


def test_progress_line_leaves_out_what_was_not_measured() -> None:
    assert progress_line({"step": 10, "train/loss": 8.0, "val/rec/full/ndcg_at_10": None}, 30) == \
        "step 10/30 | loss 8"
