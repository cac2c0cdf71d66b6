"""A hook for the signal tests: with ``GEFFECT_TEST_PAUSE=STEP:FOLDER`` in its environment, each process of a run
that finishes step STEP (its checkpoint included, when it has one) touches ``FOLDER/paused-<rank>`` and waits there
until a signal stops it. A test that signals a run can then not see it end first, however fast the machine."""
from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "GEFFECT_TEST_PAUSE"


def pause_if_asked(number: int) -> None:
    """Wait for a signal after step ``number`` when `ENV` asks for it; nothing otherwise."""
    asked = os.environ.get(ENV)
    if not asked:
        return
    step, folder = asked.split(":", 1)
    if int(step) != number:
        return
    (Path(folder) / f"paused-{os.environ.get('RANK', '0')}").touch()
    while True:  # SIGTERM and Ctrl-C are raised here (`cli.main`)
        time.sleep(0.1)
