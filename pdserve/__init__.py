"""pdserve: prefill/decode disaggregated LLM serving with decoupled data-parallel ranks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from pdserve.engine.engine import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":  # lazy: importing pdserve must not import torch
        from pdserve.engine.engine import Engine

        return Engine
    raise AttributeError(name)


__all__ = ["Engine", "__version__"]
