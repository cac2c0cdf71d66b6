"""``main``: parse, run the command, and turn bad input, Ctrl-C and SIGTERM into one line and an exit status."""
from __future__ import annotations

import os
import signal
import sys
import traceback

from .errors import EXIT_ERROR, OutOfMemory, first_line, out_of_memory, user_errors
from .parser import build_parser


class Stopped(KeyboardInterrupt):
    """SIGTERM (what ``timeout``, systemd and Slurm send) raised where the program is, like Ctrl-C: the run folder
    keeps its last complete checkpoint and the lock is released on the way out."""


_STOPPING = []  # the signal that is stopping this process: what fails after it is a consequence, not an error


def _stop_on_sigterm(signum, frame):
    _stop_once()
    raise Stopped()


def _stop_once():
    """From the first Ctrl-C or SIGTERM on, the others are ignored (torchrun forwards one more to each rank)."""
    _STOPPING.append(True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _says_errors() -> bool:
    """Whether this process prints errors: always, except the ranks of a torchrun group started by hand, where
    rank 0 alone speaks (`geffect train --nproc` collects each rank's stderr and prints one line)."""
    return os.environ.get("RANK", "0") == "0" or bool(os.environ.get("GEFFECT_LAUNCHED"))


def _stopped_line(err) -> str:
    what = "SIGTERM" if isinstance(err, Stopped) else "Ctrl-C (SIGINT)"
    return (f"geffect: stopped by {what}; a run folder keeps its last checkpoint: the same command resumes from "
            f"it")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv or os.environ.get("GEFFECT_DEBUG", "0") not in ("", "0")
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if _main_thread() else {}
    if previous:
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # `train --nproc` relaunches the same command under torchrun
        args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: one line, the conventional 128 + signal status
        if _main_thread():
            _stop_once()
        if debug:
            traceback.print_exc()
        if _says_errors():
            print(_stopped_line(err), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Stopped) else signal.SIGINT)
    except Exception as err:
        if _STOPPING:  # e.g. another rank stopped first and a collective broke: stopped, not failed
            if debug:
                traceback.print_exc()
            if _says_errors():
                print(_stopped_line(Stopped()), file=sys.stderr)
            return 128 + signal.SIGTERM
        err = out_of_memory(err) or err
        if not isinstance(err, (*user_errors(), OutOfMemory)):
            raise
        if debug:
            traceback.print_exc()
        if _says_errors():  # under torchrun every rank meets the same bad input: say it once
            print(f"geffect: error: {first_line(err)}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
        _STOPPING.clear()
    return 0


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
