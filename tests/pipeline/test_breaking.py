"""buf breaking holds the seed's wire contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.pipeline

SEED_IMAGE = ROOT / "tests" / "pipeline" / "seed" / "seed.binpb"
SEED_RULES = json.dumps({"version": "v2", "modules": [{"path": "proto"}], "breaking": {"use": ["PACKAGE"]}})


def _buf() -> str:
    found = shutil.which("buf", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert found, "buf (buf-bin) is not installed"
    return found


def _breaking(workspace: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), "breaking", "--against", str(SEED_IMAGE), "--config", SEED_RULES],
        cwd=workspace,
        capture_output=True,
        text=True,
    )


def _copy_workspace(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    return tmp_path


def test_the_current_proto_is_compatible_with_the_seed(tmp_path):
    result = _breaking(_copy_workspace(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("  string token = 1;\n", "", 'field "1" with name "token"'),
        ("string prompt = 1;", "bytes prompt = 1;", "type"),
        ("  rpc Generate(", "  rpc Produce(", "Generate"),
    ],
)
def test_a_breaking_change_fails(tmp_path, old, new, message):
    workspace = _copy_workspace(tmp_path)
    proto = workspace / "proto" / "entity" / "grpc" / "llm.proto"
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    result = _breaking(workspace)
    assert result.returncode != 0
    assert message in result.stdout
