"""Build hook: generate _gen/ from the proto tree (packages/_build/hatch_build.py)."""

from pathlib import Path
from runpy import run_path

_here = Path(__file__).parent
_shared = _here / "_build" if (_here / "_build").is_dir() else _here.parent / "_build"  # sdist, checkout
get_build_hook = run_path(str(_shared / "hatch_build.py"))["get_build_hook"]
