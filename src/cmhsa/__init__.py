"""cmhsa: exact convolution -> multi-head self-attention, and Vision Transformers that start as CNNs."""
from .tokens import image_to_tokens, tokens_to_image
from .attention import RelPosMHSA
from .convert import DEFAULT_BIAS_STRENGTH, VerifyReport, conv_to_mhsa, required_heads, verify
from .bounds import best_fit_error, best_fit_errors, head_lower_bound
from .models import CMHSA, convert_model, transfer_error
from .network import ConvAsAttention, convert_network

__version__ = "0.1.0"
from . import baselines  # registers vit_mimetic with timm
