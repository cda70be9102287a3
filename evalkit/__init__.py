"""evalkit: an asynchronous trustworthiness evaluator for OpenAI-compatible endpoints."""

__version__ = "0.1.0"
