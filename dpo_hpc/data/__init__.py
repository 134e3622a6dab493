"""Data: sources (hub name or local path), HH parsing, tokenization into keyed examples
(``pipeline``), collation, the step-indexed sampler, and the verifiable synthetic task."""

from .sources import DataError

__all__ = ["DataError"]
