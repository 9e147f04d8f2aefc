"""A local Azure stand-in for orch's Azure ML system: a TLS server for the ARM/MFE control plane, workspace
discovery, run history, data plane, registry discovery, Key Vault and token routes, plus Azurite (blob) and a
real MLflow server. The real, unpatched azure-ai-ml SDK talks to it through its sovereign-cloud path.

Public API: `start_standin(tmp_dir, ...)` (a context manager yielding a `StandIn`). See infra/local-azure.md.
"""

from .server import StandIn, start_standin

__all__ = ["StandIn", "start_standin"]
