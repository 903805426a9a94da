"""``python -m pipelines``: the command line (``pipelines.cli``)."""

import os
import sys

from pipelines.cli import main
from pipelines.interrupts import EXIT_INTERRUPTED

if __name__ == "__main__":
    code = main()
    if code == EXIT_INTERRUPTED:
        # Interrupted: what is committed is kept and said; end now, before the interpreter's
        # shutdown meets worker threads still inside native code (torch, gRPC).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
