"""Reading runs back from MLflow: comparison tables, plots, reproduction checks."""
