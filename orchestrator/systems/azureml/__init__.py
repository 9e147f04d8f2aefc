"""Azure ML: the system (command jobs per pass), the driver job of `orch submit`, workspace settings, downloads of
remote references, and the CLI verbs (submit/status/logs/cancel/download/config). Nothing here imports a pass."""

from orchestrator.systems.azureml.handle import AzureMLJobHandle
from orchestrator.systems.azureml.system import AzureMLSystem

__all__ = ["AzureMLJobHandle", "AzureMLSystem"]
