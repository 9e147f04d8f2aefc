"""conda.yaml environments, one job a module: `spec` (read, validate, hash), `runtime_layer` (orch's own imports
added to a user's file), `package_indexes` (the host's pip settings, carried into builds; indexes probed) and
`local_venv` (a spec realized on this host). Docker images (systems/docker/images) and Azure ML Environments
(systems/azureml/job_environment) are built from the same specs."""
