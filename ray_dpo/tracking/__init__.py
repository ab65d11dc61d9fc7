"""Metrics (pure), the MLflow sink (driver side) and the Ray Train callback feeding it."""
