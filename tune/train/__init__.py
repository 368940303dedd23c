"""Train: one run on Ray Train (the trainer, the per-worker loop, the null-space bases and item
vectors it is given); below every other stage of tune/."""
