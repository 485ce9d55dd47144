"""The engine process's entry point: `python -m entity_llm_server.engine.worker FD PARENT_PID`.

A module of its own so that what the engine process pickles (its classes live
in `engine.process`) is named by their real module, never `__main__`.
"""

from __future__ import annotations

import os
import sys

from .process import serve

if __name__ == "__main__":
    code = serve(int(sys.argv[1]), int(sys.argv[2]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the batching thread is stopped; skip tearing down torch's threads
