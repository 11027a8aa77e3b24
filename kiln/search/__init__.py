"""Architecture and hyperparameter search."""
