"""What orch picks for LoRA training on a CUDA device, so the user's config can stay the seed's.

The LoRA pass calls `cuda_overrides` only when it trains on CUDA; on CPU nothing here runs.
"""

from __future__ import annotations

from typing import Any


def cuda_overrides(model: Any, sft_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Return SFTConfig kwargs updated with the CUDA fast path (bf16 where the GPU supports it)."""
    import torch

    out = dict(sft_kwargs)
    if torch.cuda.is_bf16_supported() and not out.get("fp16"):
        out.setdefault("bf16", True)
    return out
