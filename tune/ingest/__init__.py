"""Ingest: the Ray Data stage that turns raw logs into prompt shards (the per-unit logic is pure
polars in gems.data; Ray code lives under tune/, never in gems/)."""
