"""Evaluation: metrics with the empty-mask rule, per-image scoring and the HTML report."""
