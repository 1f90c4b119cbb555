"""structc: a compiler for structured neural networks.

    net = structc.compile("model.snet")
    probs = net(x=images)
    loss = net.train_step(x=images, y=labels, lr=0.05)
"""
from .errors import SnetError, SnetNameError, SnetShapeError, SnetSyntaxError, SnetTypeError, Span  # noqa: F401

__version__ = "0.1.0"

from ._bootstrap import ensure_runtime as _ensure_runtime  # noqa: E402

_ensure_runtime()           # a source checkout without the built runtime builds it (or says what to do)

from .api import compile  # noqa: E402,F401,A001
from .graphs import Graph, batch  # noqa: E402,F401
from .model import Net  # noqa: E402,F401
from .forest import Forest  # noqa: E402,F401
from .seqdata import Sequences  # noqa: E402,F401
from .native import get_num_threads, set_num_threads  # noqa: E402,F401
from .ship import load  # noqa: E402,F401
