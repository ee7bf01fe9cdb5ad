"""cmhsa: exact convolution -> multi-head self-attention, and Vision Transformers that start as CNNs."""
from .tokens import image_to_tokens, tokens_to_image
from .attention import FactorizedRelPosMHSA, RelPosMHSA
from .local_attention import LocalRelPosMHSA
from .tied import TiedRelPosMHSA
from .anchor import PolyphaseAnchor
from .convert import DEFAULT_BIAS_STRENGTH, conv_to_mhsa, required_heads
from .exactness import VerifyReport, verify
from .bounds import best_fit_error, best_fit_errors, head_lower_bound
from .models import CMHSA, convert_model, transfer_error, with_img_size
from .forms import convert_form
from .network import ConvAsAttention, convert_network

__version__ = "0.1.0"
from . import baselines  # registers vit_mimetic with timm
