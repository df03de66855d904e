"""persrec: sequential recommendation over long user histories with personalized expert tokens."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_recommender"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import persrec` (and every CLI command) stays free of torch until it is needed.
    if name == "load_recommender":
        from persrec.serve.recommender_api import load_recommender

        return load_recommender
    raise AttributeError(f"module 'persrec' has no attribute {name!r}")
