"""adaptflow: few-shot domain-adaptation studies as Prefect flows tracked in MLflow."""

__version__ = "0.1.0"
