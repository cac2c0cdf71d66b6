"""``python -m geffect_kernels COMMAND ...`` (the ``geffect`` command), e.g. under
``torchrun --nproc-per-node N -m geffect_kernels train ...`` for a sharded run."""
import sys

from .cli import main

sys.exit(main())
