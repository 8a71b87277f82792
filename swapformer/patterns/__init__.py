"""Attention and FFN detectors over FX graphs (they import nothing else from swapformer)."""
