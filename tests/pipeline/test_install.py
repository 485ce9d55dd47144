"""Both wheels install side by side in fresh venvs and import in one process."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ..architectures import build_sentencepiece_only

pytestmark = pytest.mark.pipeline


def _venv(path) -> str:
    # virtualenv (a test dependency) seeds pip from its cache: seconds faster than `python -m venv`.
    subprocess.run([sys.executable, "-m", "virtualenv", "-q", str(path)], check=True)
    return str(path / "bin" / "python")


def _seed_torch(venv: Path) -> None:
    """Put the torch this interpreter runs, and what it requires, into a fresh venv as hard links of the
    installed files (what pip would unpack there, in a second instead of a minute): the wheels under
    test then install with pip resolving every other dependency, and find their torch floor met."""
    from packaging.requirements import Requirement

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = venv / "lib" / version / "site-packages"
    todo, seen = ["torch"], set()
    while todo:
        dist = importlib.metadata.distribution(todo.pop())
        name = dist.metadata["Name"].lower()
        if name in seen:
            continue
        seen.add(name)
        todo += [r.name for r in map(Requirement, dist.requires or []) if not r.marker or r.marker.evaluate()]
        root = Path(str(dist.locate_file(""))).resolve()
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file))).resolve()
            if not source.is_relative_to(root) or not source.is_file():
                continue  # a console script outside site-packages: not needed here
            target = site / source.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                try:
                    os.link(source, target)
                except OSError:  # another file system
                    shutil.copy2(source, target)


def _pip(python: str, *args: str) -> None:
    # --no-compile: byte-compiling every installed module is a third of the install; imports compile what they use.
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-compile", *args], check=True, capture_output=True)


def test_no_module_path_is_shipped_by_both_wheels(dist):
    def modules(wheel) -> set[str]:
        with zipfile.ZipFile(wheel) as archive:
            return {n for n in archive.namelist() if ".dist-info/" not in n}

    client, server = (modules(dist[n]["wheel"]) for n in ("entity-llm-client", "entity-llm-server"))
    assert not client & server
    assert {n.split("/")[0] for n in client} == {"entity_llm_client"}
    assert {n.split("/")[0] for n in server} == {"entity_llm_server", "grpc_services"}


def test_the_client_wheel_installs_without_torch(tmp_path, dist):
    python = _venv(tmp_path / "venv")
    _pip(python, str(dist["entity-llm-client"]["wheel"]))
    code = (
        "import importlib.util, entity_llm_client\n"
        "assert importlib.util.find_spec('torch') is None, 'torch was installed'\n"
        "assert importlib.util.find_spec('transformers') is None\n"
        "assert importlib.util.find_spec('google') is None, 'google-protobuf was installed'\n"
        "from entity_llm_client._gen.entity.grpc import GenerateRequest\n"
        "print(bytes(GenerateRequest(prompt='hé')).hex())\n"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0a0368c3a9"  # field 1, length 3, UTF-8 "hé"


def test_both_wheels_install_side_by_side_and_import_in_one_process(tmp_path, dist):
    python = _venv(tmp_path / "venv")
    _seed_torch(tmp_path / "venv")
    _pip(python, str(dist["entity-llm-client"]["wheel"]), str(dist["entity-llm-server"]["wheel"]))
    code = (
        "import sys\n"
        "import entity_llm_client, entity_llm_server\n"
        "from grpc_services import llm_pb2\n"
        "from entity_llm_client._gen.entity.grpc import GenerateRequest\n"
        "wire = bytes(GenerateRequest(prompt='x'))\n"
        "assert llm_pb2.GenerateRequest.FromString(wire).prompt == 'x'\n"
        "assert 'torch' not in sys.modules, 'import pulled torch'\n"
        "print(entity_llm_server.default_model_path().is_dir())\n"
    )
    out = subprocess.run([python, "-W", "error", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
    # Without the [sentencepiece] extra, a tokenizer that is only a SentencePiece
    # model cannot become a fast one: refused at start, saying what to install.
    folder = build_sentencepiece_only(tmp_path / "sp-model")
    load = (
        "import sys\n"
        "from entity_llm_server import UnifiedLLMResource\n"
        "from entity_llm_server.resource import ModelLoadError\n"
        "try:\n"
        "    UnifiedLLMResource(sys.argv[1]).load_engine()\n"
        "except ModelLoadError as exc:\n"
        "    print(exc)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([python, "-c", load, str(folder)], capture_output=True, text=True, check=True, env=env)
    assert "it is a SentencePiece model (tokenizer.model) without tokenizer.json" in out.stdout
    assert "pip install 'entity-llm-server[sentencepiece]'" in out.stdout
