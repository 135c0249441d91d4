"""sap_kernels: fast, exact PQ Index and magnitude pruning for PyTorch models.

import sap_kernels
sap_kernels.pqi(model)                       # global PQ Index, float64
sap_kernels.pqi(model, scope="layer")        # one value per weight tensor
"""

from ._extension import has_cuda_kernels, has_extension
from ._inputs import default_parameter_filter, parameters_to_prune
from .api import PQSums, pq_sums, pqi
from .checkpoint import pqi_of_checkpoint
from .ops import available_backends
from .sap import LotteryTicketPolicy, OneShotPolicy, Pruner, PruningRecord, SAPPolicy, sap_counts
from .selection import apply_masks_, magnitude_threshold, prune, prune_
from .sparsity import pqi_from_sums, pqi_upper_bound, sap_prune_counts

__all__ = [
    "LotteryTicketPolicy",
    "OneShotPolicy",
    "Pruner",
    "PruningRecord",
    "SAPPolicy",
    "sap_counts",
    "PQSums",
    "apply_masks_",
    "magnitude_threshold",
    "prune",
    "prune_",
    "available_backends",
    "default_parameter_filter",
    "has_cuda_kernels",
    "has_extension",
    "parameters_to_prune",
    "pq_sums",
    "pqi",
    "pqi_from_sums",
    "pqi_of_checkpoint",
    "pqi_upper_bound",
    "sap_prune_counts",
]

__version__ = "0.1.0"
