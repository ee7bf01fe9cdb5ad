"""cmhsa: exact convolution -> multi-head self-attention, and Vision Transformers that start as CNNs."""
from .tokens import image_to_tokens, tokens_to_image
from .attention import RelPosMHSA

__version__ = "0.1.0"
