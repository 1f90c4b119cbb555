"""Every op, registered by importing its module."""
from .base import REGISTRY, Elementwise, Op, Sample, register_op, unbroadcast  # noqa: F401
from . import source, elementwise, matmul, shape, reduce, loss, optim  # noqa: F401,E402
from . import message, attention, node_loss  # noqa: F401,E402
from . import embedding, tree  # noqa: F401,E402
from . import conv, pool, patches  # noqa: F401,E402
from . import recurrent, random  # noqa: F401,E402
from . import norm  # noqa: F401,E402
