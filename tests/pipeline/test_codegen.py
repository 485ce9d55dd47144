"""Codegen: one recipe, deterministic, the same from nox and from the build hooks."""

from __future__ import annotations

import importlib.util
import re
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest

from .conftest import PACKAGES, ROOT

pytestmark = pytest.mark.pipeline


def _codegen():
    spec = importlib.util.spec_from_file_location("entity_codegen", ROOT / "packages" / "_build" / "entity_codegen.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generate_into(tmp: Path, name: str) -> dict[str, bytes]:
    """Run the recipe on a copy of a package's source; return {path in src: bytes}."""
    package = tmp / "packages" / name
    shutil.copytree(ROOT / "packages" / name / "src", package / "src", ignore=shutil.ignore_patterns("_gen"))
    if (ROOT / "packages" / name / "third_party").is_dir():  # the package's private proto inputs
        shutil.copytree(ROOT / "packages" / name / "third_party", package / "third_party")
    files = _codegen().generate(ROOT / "buf.gen.yaml", ROOT / "proto", package, f"packages/{name}/")
    return {f.relative_to(package / "src").as_posix(): f.read_bytes() for f in files}


@pytest.mark.parametrize("name", PACKAGES)
def test_codegen_twice_gives_identical_files(tmp_path, name):
    first = _generate_into(tmp_path / "a", name)
    second = _generate_into(tmp_path / "b", name)
    assert first == second
    assert first, "codegen wrote nothing"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "entity-llm-server",
            {
                "entity_llm_server/_gen/entity/grpc/llm_pb2.py",
                "entity_llm_server/_gen/entity/grpc/llm_pb2.pyi",
                "entity_llm_server/_gen/entity/grpc/llm_pb2_grpc.py",
                "entity_llm_server/_gen/entity/grpc/llm_pb2_grpc.pyi",
            },
        ),
        (
            "entity-llm-client",
            {
                "entity_llm_client/_gen/entity/grpc/__init__.py",
                "entity_llm_client/_gen/google/rpc/__init__.py",
                "entity_llm_client/_gen/google/protobuf/__init__.py",
            },
        ),
    ],
)
def test_each_wheel_ships_its_generated_code_as_nox_codegen_writes_it(tmp_path, dist, name, expected):
    generated = _generate_into(tmp_path, name)
    assert expected <= generated.keys()
    if name == "entity-llm-server":  # the vendored google.rpc protos are the client's alone
        assert not [path for path in generated if "/google/" in path]
    with zipfile.ZipFile(dist[name]["wheel"]) as wheel:
        shipped = {n: wheel.read(n) for n in wheel.namelist() if "/_gen/" in n}
    assert shipped == generated
    for path, content in generated.items():
        if path.endswith((".py", ".pyi")):
            assert re.search(rb"(?i)do not edit", content[:400]), f"{path} lacks a DO-NOT-EDIT header"


@pytest.mark.parametrize("name", PACKAGES)
def test_sdists_carry_the_proto_tree_but_no_generated_code(dist, name):
    source = dist[name]["source"]
    assert (source / "proto" / "entity" / "grpc" / "llm.proto").read_text() == (
        ROOT / "proto" / "entity" / "grpc" / "llm.proto"
    ).read_text()
    assert (source / "buf.gen.yaml").exists()
    if name == "entity-llm-client":
        vendored = ROOT / "packages" / name / "third_party" / "googleapis"
        for proto in ("google/rpc/status.proto", "google/rpc/error_details.proto"):
            assert (source / "third_party" / "googleapis" / proto).read_bytes() == (vendored / proto).read_bytes()
    import tarfile

    with tarfile.open(dist[name]["sdist"]) as archive:
        assert not [n for n in archive.getnames() if "/_gen/" in n]


def test_generators_are_pinned_alike_and_runtimes_floored_to_match(tmp_path):
    nox_pins = set(re.findall(r'"([\w-]+==[\d.]+)"', (ROOT / "noxfile.py").read_text()))
    projects = {name: tomllib.loads((ROOT / "packages" / name / "pyproject.toml").read_text()) for name in PACKAGES}
    for project in projects.values():
        for requirement in project["build-system"]["requires"]:
            assert "==" in requirement, f"build requirement {requirement} is not pinned"
            if not requirement.startswith("hatchling"):
                assert requirement in nox_pins, f"{requirement} differs from the noxfile's pin"

    server_gen = _generate_into(tmp_path / "s", "entity-llm-server")
    gencode = re.search(
        rb"Protobuf Python Version: ([\d.]+)", server_gen["entity_llm_server/_gen/entity/grpc/llm_pb2.py"]
    )
    grpc_gen = re.search(
        rb"GRPC_GENERATED_VERSION = '([\d.]+)'", server_gen["entity_llm_server/_gen/entity/grpc/llm_pb2_grpc.py"]
    )
    server_deps = projects["entity-llm-server"]["project"]["dependencies"]
    assert f"protobuf>={gencode.group(1).decode()}" in server_deps
    assert f"grpcio>={grpc_gen.group(1).decode()}" in server_deps

    client_gen = _generate_into(tmp_path / "c", "entity-llm-client")
    compiler = re.search(
        rb'_COMPILER_VERSION = "(\d+)\.(\d+)\.\d+"', client_gen["entity_llm_client/_gen/entity/grpc/__init__.py"]
    )
    major, minor = (int(x) for x in compiler.groups())
    client_deps = projects["entity-llm-client"]["project"]["dependencies"]
    assert f"betterproto2>={major}.{minor}.0,<{major}.{minor + 1}" in client_deps
