"""``python -m geffect_kernels COMMAND ...`` (the ``geffect`` command), e.g. under
``torchrun --nproc-per-node N -m geffect_kernels train ...`` for a sharded run."""
import os
import sys

from .cli import main

if os.environ.get("GEFFECT_LAUNCHED") and "RANK" in os.environ:  # a rank of `geffect train --nproc`
    from .parent_death import end_with_torchrun

    end_with_torchrun()  # a launcher killed with SIGKILL takes torchrun, and torchrun its ranks, along
code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A rank ends without the interpreter's finalization: gloo's worker threads, destroyed there, can abort a
    # process that has finished its work (or stopped on a signal before destroying its group).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
