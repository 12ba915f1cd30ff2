"""Networks with learnable time steps: pure PyTorch modules, no I/O."""

from tauopt.models._base import TauNetwork
from tauopt.models._fractional import FractionalDNN, l1_memory_coefficients
from tauopt.models._population import TauPopulation, network_slots
from tauopt.models._reference import reference_forward
from tauopt.models._resnet import TauResNet

__all__ = [
    "FractionalDNN",
    "TauNetwork",
    "TauPopulation",
    "TauResNet",
    "l1_memory_coefficients",
    "network_slots",
    "reference_forward",
]
