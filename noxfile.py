"""The one task runner. `nox` runs the default sessions: lint, breaking, tests, docs.

`nox -s bench` runs the benchmarks; `nox -s soak` the reliability suite's long mode; `nox -s mutants` the
mutation check; `nox -s demo` runs the main job: the server on the embedded default model, streamed by the
client SDK.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ("entity-llm-client", "entity-llm-server")
# Exact pins: generated code checks its runtime, so these must match the
# packages' [build-system] pins (a pipeline test compares them).
GRPC_TOOLS = "grpcio-tools==1.85.1"
GENERATORS = (
    GRPC_TOOLS,
    "mypy-protobuf==5.1.0",
    "betterproto2-compiler==0.10.1",
    "ruff==0.17.6",
    "pyyaml==6.0.4",
)
BUF = "buf-bin==1.75.0"
# torch==2.13.0 is the CPU build this machine keeps on local disk; any other
# spec downloads multi-GB CUDA builds. Installed first, the packages' torch
# floor is then satisfied without another download.
TORCH = "torch==2.13.0"
TYPING = ("mypy==2.4.1", "types-protobuf", "grpc-stubs==1.53.0.6")
# The server's and the client's [tracing] extras: mypy checks the code that
# uses them, and the tracing tests run them.
TRACING = ("opentelemetry-sdk>=1.30", "opentelemetry-exporter-otlp-proto-grpc>=1.30")
# hatchling: mypy checks the build hook, which subclasses hatchling's interface.
LINT = ("ruff==0.17.6", *TYPING, *TRACING, "hatchling==1.33.0", "pytest", "hypothesis")
# cryptography: the TLS tests make their own CA and certificates; sentencepiece:
# the server's [sentencepiece] extra, which a tokenizer test trains a model with;
# dnslib: a DNS server whose answers a test changes, as a cluster's DNS does;
# pytest-xdist: the suite runs on two workers (`tests`), about 10 minutes instead of 18;
# uv: the pipeline tests' builds install their build requirements with it;
# jsonschema, pydantic: structured outputs are validated against their schema, and the SDK
# takes a pydantic model class as one.
TEST = (
    "pytest>=8",
    "pytest-timeout>=2.3",
    "pytest-xdist>=3.6",
    "hypothesis>=6",
    *TYPING,
    "build>=1.2",
    "virtualenv>=20",
    "cryptography>=42",
    "sentencepiece>=0.2",
    "dnslib>=0.9.24",
    "uv>=0.5",
    "jsonschema>=4",
    "pydantic>=2",
    *TRACING,
)

# The docs site: pinned, so that a strict build fails for our pages, not for a new release's warnings.
DOCS = ("mkdocs==1.6.1", "mkdocs-material==9.8.2", "mkdocstrings==1.0.8", "mkdocstrings-python==2.0.11")

nox.options.sessions = ["lint", "breaking", "tests", "docs"]
# The Pythons the packages support (requires-python >= 3.11); `tests` runs the whole suite on the first.
PYTHONS = ("3.11", "3.12", "3.13")
nox.options.error_on_missing_interpreters = True
nox.options.default_venv_backend = "virtualenv"


def _find_pyenv_pythons() -> None:
    """pyenv keeps installed Pythons off PATH unless they are selected: select the newest patch
    release of each supported one after the current, so that `versions` finds 3.12 and 3.13."""
    if shutil.which("pyenv") is None:
        return
    listed = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True, check=False).stdout
    # pyenv's own shims (nox's, when pyenv installed it) set PYENV_VERSION to the one they ran.
    current = (
        os.environ.get("PYENV_VERSION")
        or subprocess.run(["pyenv", "version-name"], capture_output=True, text=True, check=False).stdout.strip()
    )
    newest: dict[str, str] = {}
    for version in listed.split():
        minor = ".".join(version.split(".")[:2])
        if minor in PYTHONS and version.replace(".", "").isdigit():
            newest[minor] = max(newest.get(minor, version), version, key=lambda v: tuple(map(int, v.split("."))))
    if current and newest:
        os.environ["PYENV_VERSION"] = ":".join(dict.fromkeys([*current.split(":"), *newest.values()]))


_find_pyenv_pythons()


def _install_packages(session: nox.Session) -> None:
    # A plain (non-editable) install runs each package's build hook, which
    # regenerates its _gen/ from the proto tree: never stale, even with -R.
    session.install(TORCH)
    session.install(*(f"./packages/{name}" for name in PACKAGES))


@nox.session(python="3.11")
def codegen(session: nox.Session) -> None:
    """Regenerate both packages' _gen/ from proto/ with the build hooks' code."""
    session.install(*GENERATORS)
    session.run("python", "packages/_build/entity_codegen.py", str(ROOT), *PACKAGES)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """buf lint + format check, ruff, and mypy --strict on hand-written code."""
    session.install(BUF, *LINT)
    session.run("buf", "lint")
    session.run("buf", "format", "--diff", "--exit-code")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    _install_packages(session)
    session.run("mypy")


@nox.session(python="3.11")
def breaking(session: nox.Session) -> None:
    """buf breaking against the seed's proto (the wire floor) and against main."""
    session.install(BUF)
    seed_rules = '{"version":"v2","modules":[{"path":"proto"}],"breaking":{"use":["PACKAGE"]}}'
    session.run("buf", "breaking", "--against", "tests/pipeline/seed/seed.binpb", "--config", seed_rules)
    has_main = subprocess.run(
        ["git", "rev-parse", "--verify", "--quiet", "main"], cwd=ROOT, capture_output=True, check=False
    )
    if has_main.returncode == 0:
        session.run("buf", "breaking", "--against", ".git#branch=main")
    else:
        session.log("no main branch: checked against the seed only")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite: unit, integration, model, e2e and pipeline tiers, on two workers (a test file each)."""
    session.install(BUF, *TEST, *GENERATORS)
    _install_packages(session)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # tests/docs runs in the docs session, which has the docs' server and tools. The slowest tests
    # are listed at the end: `nox` has a budget (CONTRIBUTING.md).
    args = ("-n", "2", "--dist", "loadfile", "--durations", "15", "--ignore=tests/docs")
    session.run("pytest", *args, *session.posargs, env=env)


# What runs without torch, so on every supported Python: the unit and integration tiers (real
# grpc.aio servers on FakeEngine or a capturing servicer) and the client command's tests that need
# no model (those that do carry the `model` marker).
TORCH_FREE_TESTS = ("tests/unit", "tests/integration", "tests/e2e/test_client_cli.py")
# pytest-timeout: pyproject's `timeout` needs it; cryptography: the TLS tests' CA; pyyaml: the
# deploy manifests; grpcio-tools: the docs' protocol reference.
TORCH_FREE_TEST_DEPS = ("pytest>=8", "pytest-timeout>=2.3", "cryptography>=42", "pyyaml", GRPC_TOOLS, *TRACING)


def _server_requirements_without_torch() -> list[str]:
    """The server's dependencies, from its pyproject, less torch and accelerate (which needs torch)."""
    pyproject = tomllib.loads((ROOT / "packages" / "entity-llm-server" / "pyproject.toml").read_text())
    requirements: list[str] = pyproject["project"]["dependencies"]
    return [r for r in requirements if re.split(r"[^A-Za-z0-9_.-]", r, maxsplit=1)[0] not in {"torch", "accelerate"}]


@nox.session(python=PYTHONS)
def versions(session: nox.Session) -> None:
    """The client's tests, and the server's that need no model, on every supported Python.

    torch stays out on every version alike: this machine keeps a CPU build for 3.11 only, and
    elsewhere it is a multi-GB download. `tests` runs the whole suite, torch included, on 3.11;
    CI runs this session on the others.
    """
    session.install(*TORCH_FREE_TEST_DEPS, *_server_requirements_without_torch())
    session.install("./packages/entity-llm-client")
    session.install("--no-deps", "./packages/entity-llm-server")  # its dependencies but torch are above
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    session.run("pytest", *TORCH_FREE_TESTS, "-m", "not model", *session.posargs, env=env)


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The docs site, built with --strict into site/, and every example in it and in the README run."""
    # grpcio-tools: the protocol reference is read from the proto by its protoc; pydantic: an example.
    session.install(*DOCS, GRPC_TOOLS, "pytest>=8", "pytest-timeout>=2.3", "pydantic>=2")
    _install_packages(session)
    env = {"HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1"}
    session.run("mkdocs", "build", "--strict", "--site-dir", "site", env=env)
    session.run("pytest", "tests/docs", *session.posargs, env=env)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """Serve the embedded default model and stream a sample prompt through the client SDK."""
    _install_packages(session)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{session.bin}{os.pathsep}{os.environ['PATH']}"}
    session.run("python", "examples/clients/stream_demo.py", *session.posargs, env=env)


# What `nox -s bench` runs, after `python`: the commands benchmarks/README.md
# quotes for its CPU tables, argument for argument. About 30 minutes on 2 cores.
BENCH = (
    "benchmarks/transport.py",
    "benchmarks/model_path.py --streams 1,32 --repeat 3 --sequential-limit 4 --compare-in-process",
    "benchmarks/scale.py",
    "benchmarks/engines.py",
    "benchmarks/model_path.py --models llama-35m --streams 32 --shared-prefix 256 --prompt-tokens 32 --new-tokens 64 "
    "--repeat 2",
    "benchmarks/features.py --repeat 3",
    "benchmarks/features.py --repeat 3 --max-batch-tokens 2048",
    "benchmarks/host.py --repeat 3",
    "benchmarks/host.py --model llama-tiny --streams 128 --new-tokens 64 --repeat 3",
)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """The CPU tables of benchmarks/README.md, by the commands it quotes (also in benchmarks/results/*.json)."""
    _install_packages(session)
    env = {"HF_HUB_OFFLINE": "1"}
    for command in BENCH:
        session.run("python", *command.split(), env=env)


@nox.session(python="3.11")
def soak(session: nox.Session) -> None:
    """The reliability suite's long mode: ≥10,000 fuzzed requests, a 10,000-request soak, a 3-minute quiet
    stream under 1 s keepalive pings; prints its figures."""
    session.install(*TEST)
    _install_packages(session)
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ENTITY_LLM_RELIABILITY": "long",
        "ENTITY_LLM_TEST_KEEPALIVE_SECONDS": "180",
    }
    args = ("tests/reliability", "tests/integration/test_keepalive.py", "-p", "no:cacheprovider", "-o", "timeout=3600")
    args = (*args, *session.posargs)
    session.run("pytest", *args, env=env)


@nox.session(python="3.11")
def mutants(session: nox.Session) -> None:
    """The mutation check: the tests guarding each promise fail when its line is changed (tests/mutants.py);
    pass mutation names to run only those."""
    session.install(*TEST)
    _install_packages(session)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    session.run("python", "tests/mutants.py", *session.posargs, env=env)


@nox.session(python="3.11")
def train(session: nox.Session) -> None:
    """Retrain the embedded default model (reproducible from its seed)."""
    session.install(TORCH, "transformers==5.24.0", "tokenizers==0.23.3", "safetensors==0.8.0")
    session.run("python", "packages/entity-llm-server/scripts/train_demo_model.py", *session.posargs)


if __name__ == "__main__":
    sys.exit("run this file with nox")
