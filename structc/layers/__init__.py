"""The language's layer library: functions callable from `.snet` that build
graphs from ops (`dense`, `conv2d`, `mean`, `mse`, ...), registered with
`@surface` by importing their module. Primitive ops live in `structc.ops`;
ops marked `surface = True` are callable directly."""
from .context import SURFACE, Context, Word, show, surface  # noqa: F401
from . import dense, conv, pool, reduce, loss, embedding, shape, compare, activation, gat  # noqa: F401,E402
from . import recurrent, norm, dropout  # noqa: F401,E402
