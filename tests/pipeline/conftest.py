"""Pipeline fixtures: sdists and wheels built the way a release builds them."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("entity-llm-client", "entity-llm-server")
# Each build installs its pinned build requirements into an isolated env; uv (a test
# dependency) does that in a fifth of pip's time. Without it, build uses pip.
INSTALLER = ["--installer", "uv"] if importlib.util.find_spec("uv") else []


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """{package: {"sdist": path, "wheel": path}}: each wheel built from its sdist alone."""
    out = tmp_path_factory.mktemp("dist")
    built: dict[str, dict[str, Path]] = {}
    for name in PACKAGES:
        sdist_dir, wheel_dir = out / name / "sdist", out / name / "wheel"
        subprocess.run(
            [sys.executable, "-m", "build", *INSTALLER, "--sdist", "-o", str(sdist_dir), str(ROOT / "packages" / name)],
            check=True,
            capture_output=True,
        )
        (sdist,) = sdist_dir.glob("*.tar.gz")
        # Unpack the sdist somewhere without the repository around it, and
        # build the wheel from that alone.
        unpacked = out / name / "unpacked"
        with tarfile.open(sdist) as archive:
            archive.extractall(unpacked, filter="data")
        (source,) = unpacked.iterdir()
        subprocess.run(
            [sys.executable, "-m", "build", *INSTALLER, "--wheel", "-o", str(wheel_dir), str(source)],
            check=True,
            capture_output=True,
        )
        (wheel,) = wheel_dir.glob("*.whl")
        built[name] = {"sdist": sdist, "wheel": wheel, "source": source}
    return built
