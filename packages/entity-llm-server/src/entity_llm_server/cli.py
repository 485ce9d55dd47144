"""The `entity-llm-server` console script."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from .auth import ApiKeyFileError
from .config import parse_config
from .logs import configure_logging
from .resource import ModelLoadError
from .server import serve
from .tls import TlsConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, serve until a signal, return the exit code."""
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_format)
    try:
        return asyncio.run(serve(config))
    except (ModelLoadError, TlsConfigError, ApiKeyFileError) as exc:
        print(f"entity-llm-server: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # tracing asked for without the `tracing` extra
        print(f"entity-llm-server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an address could not be bound
        print(f"entity-llm-server: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130


if __name__ == "__main__":
    sys.exit(main())
