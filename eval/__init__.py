"""Evaluation: metric modules for `evaluate`, task adapters, the grounding benchmark, the runner and analysis."""
