"""eomt_fast: fast EoMT image segmentation, a drop-in for transformers' EomtForUniversalSegmentation."""

from .config import ConfigError, EomtFastConfig
from .checkpoint import CheckpointError
from .model import EomtFastForUniversalSegmentation, EomtFastOutput
from .processing import EomtFastImageProcessor

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EomtFastConfig",
    "EomtFastForUniversalSegmentation",
    "EomtFastImageProcessor",
    "EomtFastOutput",
    "__version__",
]
