"""dsjax: small DeepSeek-V3-style language models in JAX."""

__version__ = "0.1.0"
