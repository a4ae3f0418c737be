"""diffad_core: the plain library (no Prefect, no MLflow)."""

__version__ = "0.1.0"
