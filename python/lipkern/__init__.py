"""lipkern: fused spectral norms and Lipschitz bounds of whole networks.

``import lipkern`` needs only torch: Triton and the compiled extension load on first use.
"""
from . import distributed, nn, reference
from .backends import BackendUnavailableError, available_backends
from .bound import LipschitzReport, lipschitz_bound
from .certified import certified_sigma
from .explain import Explanation, explain
from .layout import PowerIterState
from .ops.sn_linear import sn_linear
from .power_iter import fused_normalize, fused_power_iter
from .result import NormalizeResult, PowerIterResult
from .spec import ConvSpec

__version__ = "0.1.0"

__all__ = ["ConvSpec", "fused_power_iter", "fused_normalize", "certified_sigma", "sn_linear", "NormalizeResult", "lipschitz_bound", "LipschitzReport", "distributed", "nn", "PowerIterResult", "PowerIterState", "reference",
           "available_backends", "BackendUnavailableError", "__version__", "explain",
           "Explanation"]
