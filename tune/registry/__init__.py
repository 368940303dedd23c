"""Registry: MLflow tracking (store, experiment, run params) and the model registry (log a
checkpoint as the ranking pyfunc, register it, move aliases)."""
