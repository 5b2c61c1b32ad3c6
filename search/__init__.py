"""Propose, run, keep: the Optuna study, the Ray runner, tracking, the Pareto front."""
