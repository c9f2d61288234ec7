"""Offline evaluation: predictions, metrics by feature name, held-out-survey studies."""
