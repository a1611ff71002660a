"""The fold arithmetic lives in the foundation layer (:mod:`normswap.arith`: pure float64 tensor
functions the registry, the seed layers and both fold appliers use); this name is kept for
``from normswap.fold import arith``."""

from normswap.arith import *  # noqa: F401,F403
from normswap.arith import __all__  # noqa: F401
