"""Cross-validation: folds, one training per fold, out-of-fold decisions and the CV report."""
