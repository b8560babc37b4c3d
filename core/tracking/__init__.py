"""MLflow run records, energy and carbon. Imports no gin and nothing of ours outside core."""
