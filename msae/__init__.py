"""msae: sparse autoencoders (ReLU, TopK, BatchTopK, Matryoshka) on CLIP embeddings."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load an SAE checkpoint directory (``msae.load(path) -> SAE``)."""
    from msae.checkpoint import load as _load
    return _load(path, device)
