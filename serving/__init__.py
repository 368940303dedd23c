"""Serving: the ranking pyfunc a registered model loads, its request checks and its model file.

Imports gems and MLflow, never ray: a registered model ships only ``gems`` and this package as its
code (tune/registry/models.py), and loads where Ray is not installed.
"""
