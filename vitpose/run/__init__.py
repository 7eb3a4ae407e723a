"""Run infrastructure: MLflow tracking and its outbox, storage by URI, the Ray cluster, the console."""
