"""Evaluation: metric modules for `evaluate`, task adapters, the grounding benchmark, the runner, the lmms-eval model
and analysis."""
