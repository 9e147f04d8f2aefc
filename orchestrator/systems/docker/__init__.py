"""The Docker system (system) and its content-tagged images built from environments/*.conda.yaml (images).

Kept empty of imports: the docker SDK loads only when the system is used."""
