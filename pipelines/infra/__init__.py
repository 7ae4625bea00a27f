"""What every stage runs on: `storage` (paths and URIs through pyarrow.fs), `tracking` (MLflow), `ray_env` (the
Ray connection and the workers' runtime env) and `logs` (the console lines). Imports nothing from the rest of
`pipelines`."""
