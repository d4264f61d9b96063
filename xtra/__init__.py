"""xtra-repro: a reproduction pipeline for XTRA, the block-causal auto-regressive image model."""

__version__ = "0.1.0"
__all__ = ["__version__"]
