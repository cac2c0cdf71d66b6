"""The ``geffect`` command: demo, train, profile, report, build (``geffect COMMAND --help``).

Bad input ends with one line ``geffect: error: ...`` on stderr and exit status 1 (a bad flag too); ``--debug``
(or ``GEFFECT_DEBUG=1``) prints the full traceback before it. torch and transformers are imported inside the
commands, so ``--help`` and a bad flag answer at once.

    parser.py         the sub-commands and their flags
    defaults.py       the names and defaults the parser shows
    train_command.py  ``geffect train``
    commands.py       ``demo``, ``profile``, ``report``, ``build``
    inputs.py         checks of paths, devices, hyper-parameters; loading models and tokenizers
    errors.py         which exceptions are bad input, and how they are said
    main.py           ``main``: run a command; bad input, Ctrl-C and SIGTERM as one line and an exit status
"""
from .errors import CLIError
from .main import main
from .defaults import MAX_NEW_TOKENS, OBJECTIVE_NAMES, TRAIN_DEFAULTS
from .parser import build_parser

__all__ = ["CLIError", "MAX_NEW_TOKENS", "OBJECTIVE_NAMES", "TRAIN_DEFAULTS", "build_parser", "main"]
