"""A local Hugging Face Hub stand-in: the routes huggingface_hub and datasets call, tiny models and small data sets
under real hub names (content.py), strict about unknown routes, private repos behind a token.

Public API: `start_hub()` (a context manager yielding a `HubStandIn`; add repos with `add_repo`, or
`serve_defaults(hub, tiny_model)` for everything the corpus and tests name). Point clients at it with
HF_ENDPOINT=hub.url.
"""

from .content import serve_defaults
from .server import HubStandIn, start_hub

__all__ = ["HubStandIn", "serve_defaults", "start_hub"]
