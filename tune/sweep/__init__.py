"""Sweep: the Tune + Optuna search over train/ runs (space, tuner, the shared bases), its MLflow
parent and child runs, figures, and the champion picked from it."""
