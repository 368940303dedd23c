"""Nightly: retrain on new log partitions (plan, log slice, warm start, holdout evaluation,
decision, journal) and promote or reject the challenger."""
