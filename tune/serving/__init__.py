"""Serving: the ranking pyfunc a registered model loads, its request checks and its model file."""
