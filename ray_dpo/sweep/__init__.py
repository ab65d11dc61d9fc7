"""Sweeps: many ray_dpo runs over a grid of config values, run as Ray Tune trials.

    trials.py   the trials, worked out and checked before anything starts (pure)
    runner.py   the sweep on Ray Tune: parent MLflow run, one shared reference pass,
                early stopping, resume
"""
