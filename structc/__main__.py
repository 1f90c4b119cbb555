"""`python -m structc`: the `structc` command (also under `mpiexec ... python -m mpi4py -m structc`)."""
import sys

from .cli import main

sys.exit(main())
