"""The heavy side: everything that loads or changes model weights (torch, transformers)."""
