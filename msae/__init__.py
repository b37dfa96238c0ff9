"""msae: sparse autoencoders on CLIP embeddings (methods: msae.sae.REGISTRY), and sweeps over them."""
from msae.version import __version__


def load(path, device="cpu"):
    """Load an SAE checkpoint directory (``msae.load(path) -> SAE``)."""
    from msae.checkpoint import load as _load
    return _load(path, device)


__all__ = ["__version__", "load"]
