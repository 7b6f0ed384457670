"""``lipkern.nn``: spectral normalization per layer (a drop-in for torch's) and for a whole
model in one fused call, and layers for 1-Lipschitz networks."""
from .convert import convert_old_spectral_norm, load_old_spectral_norm
from .layers import ScaledAvgPool2d, SpectralConv2d, SpectralLinear
from .model import SpectralNormGroup, remove_spectral_norm_model, sigmas, spectral_norm_model
from .parametrization import SpectralNorm, spectral_norm

__all__ = ["spectral_norm", "SpectralNorm", "spectral_norm_model", "remove_spectral_norm_model",
           "sigmas", "SpectralNormGroup", "convert_old_spectral_norm", "load_old_spectral_norm",
           "SpectralLinear", "SpectralConv2d", "ScaledAvgPool2d"]
