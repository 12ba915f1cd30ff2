"""Networks with learnable time steps: pure PyTorch modules, no I/O."""

from models._base import TauNetwork
from models._fractional import FractionalDNN, l1_memory_coefficients
from models._reference import reference_forward
from models._resnet import TauResNet

__all__ = [
    "FractionalDNN",
    "TauNetwork",
    "TauResNet",
    "l1_memory_coefficients",
    "reference_forward",
]
