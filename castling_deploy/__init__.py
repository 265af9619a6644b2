"""castling-deploy: fold, export, quantize and verify Castling-ViT checkpoints for edge runtimes."""

__version__ = "0.1.0"
