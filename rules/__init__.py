"""liftir's built-in rules, one module per rule family of the DeepLIFT paper.

Importing this package registers every rule; the registry does so on first use.
"""
from . import (  # noqa: F401  (imported for their registrations)
    conv,
    elementwise,
    linear,
    linear_maps,
    maxout,
    normalization,
    pooling,
    product,
    recurrent,
    reductions,
    selection,
    softmax,
    views,
)
