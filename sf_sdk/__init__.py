"""sf-sdk: real-time streaming video generation with Self-Forcing causal Wan DiTs.

``from sf_sdk import StreamingGenerator`` is the entry point; everything else is importable from
its submodules (``sf_sdk.config``, ``sf_sdk.models.dit``, ``sf_sdk.cache``, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["StreamingGenerator", "__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from sf_sdk.generator import StreamingGenerator


def __getattr__(name: str) -> Any:
    # Lazy: importing sf_sdk stays cheap and never builds kernels or loads weights.
    if name == "StreamingGenerator":
        from sf_sdk.generator import StreamingGenerator

        return StreamingGenerator
    raise AttributeError(f"module 'sf_sdk' has no attribute {name!r}")
