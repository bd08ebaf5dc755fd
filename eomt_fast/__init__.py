"""eomt_fast: fast EoMT image segmentation, a drop-in for transformers' EomtForUniversalSegmentation."""

from .config import ConfigError, EomtFastConfig
from .checkpoint import CheckpointError
from .model import EomtFastForUniversalSegmentation, EomtFastOutput

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EomtFastConfig",
    "EomtFastForUniversalSegmentation",
    "EomtFastOutput",
    "__version__",
]
