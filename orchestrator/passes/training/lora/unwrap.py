"""The transformers model inside a PeftModel, for the CUDA fast path's modules.

The plan (cuda.py) reads its config, the Phi-3 rewrites (phi3_patches.py) patch its modules and the fused loss
(fused_loss.py) calls its backbone and head: one helper here, so that none of them imports another for it.
"""

from __future__ import annotations

from typing import Any


def base_model(model: Any) -> Any:
    """The transformers PreTrainedModel inside a PeftModel (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model
