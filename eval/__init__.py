"""Offline evaluation: predict, metrics by feature name, model comparison, the held-out-survey study, robustness,
embeddings and neighbours, plots and a self-contained HTML report. Needs no GPU and no training state."""
