"""Hatch build hook shared by both packages: generate `_gen/` from the proto tree.

Each package's `hatch_build.py` loads this file (from `_build/` in an sdist).
It runs packages/_build/entity_codegen.py, the same code `nox -s codegen`
runs, for wheels and editable installs; an sdist carries the proto tree, the
recipe and the codegen module instead of generated code, so that a wheel builds
from the sdist alone.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _load_codegen(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location("entity_codegen", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class CodegenBuildHook(BuildHookInterface):  # type: ignore[type-arg]  # hatchling ships no generics
    """Regenerates the package's `_gen/` subpackage before a wheel is built."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name == "sdist":
            return
        package_dir = Path(self.root)
        if (package_dir / "buf.gen.yaml").exists():  # an unpacked sdist
            base, codegen_file = package_dir, package_dir / "_build" / "entity_codegen.py"
        else:  # a checkout: packages/NAME inside the repository
            base = package_dir.parent.parent
            codegen_file = base / "packages" / "_build" / "entity_codegen.py"
        codegen = _load_codegen(codegen_file)
        files = codegen.generate(base / "buf.gen.yaml", base / "proto", package_dir, f"packages/{self.metadata.name}/")
        if version == "editable":  # src/ itself goes on sys.path
            return
        # _gen/ is gitignored, which hatch honours; include it explicitly.
        for path in files:
            rel = path.relative_to(package_dir / "src").as_posix()
            build_data["force_include"][str(path)] = rel


def get_build_hook() -> type[CodegenBuildHook]:
    """hatchling's entry point for a custom build hook."""
    return CodegenBuildHook
