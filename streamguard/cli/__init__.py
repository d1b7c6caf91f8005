"""``streamguard`` command line: a thin typer + rich layer over the library.

Every command registered with ``@app.command()`` gets the same error handling: a
:class:`StreamGuardError` becomes one red ``error: ...`` line on stderr and exit code
``err.exit_code``; Ctrl-C exits with 130. Heavy imports (torch, models) happen inside commands
so ``streamguard --help`` stays fast. Progress bars go to stderr and are off when stderr is not a
terminal or ``STREAMGUARD_NO_PROGRESS=1``; summaries go to stdout.
"""

from __future__ import annotations

import sys

from ..errors import StreamGuardError
from .common import app, fail

# the commands register themselves on ``app`` when their modules are imported
from . import stream, research, export, data, train  # noqa: E402, F401, I001  isort: skip


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except StreamGuardError as e:
        fail(str(e), e.exit_code)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
