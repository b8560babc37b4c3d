"""Text data for language models: TFDS sources, the embedded corpus, packing, mixtures.

The entry point is `core.data.pipeline.lm_batches`; it is not imported here so
that importing a small piece (e.g. packing) stays cheap.
"""

from core.data.errors import DataError

__all__ = ["DataError"]
