"""deploy/: the container recipes and Kubernetes manifests agree with the server they run.

Checked against the server's own parser and metrics, so that a renamed flag, a
port changed in one place only, or a probe on the wrong port fails here rather
than in a cluster. No container daemon and no cluster are needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from entity_llm_server.config import ENV_PREFIX, build_parser, parse_config
from entity_llm_server.health import LLM_SERVICE
from entity_llm_server.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile*") if p.suffix != ".dockerignore")

# Variables a pod may set besides the server's flags: the Hub's offline switch
# and cache, OpenTelemetry's standard ones, and torch's thread count (torch
# sizes its pool by the node's cores, not by the pod's CPU limit).
OTHER_VARIABLES = frozenset({"HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS"})
OTHER_PREFIXES = ("OTEL_",)
# Container port name -> the ServerConfig field that sets it.
PORTS = {"grpc": "port", "health": "health_port", "metrics": "metrics_port"}
# What the image build may copy from the repository: what the build hooks read.
BUILD_INPUTS = frozenset({"proto", "buf.yaml", "buf.gen.yaml", "packages"})
# The kubelet's default when a pod sets no termination grace period.
KUBERNETES_TERMINATION_GRACE = 30
# A startup probe must allow a model several minutes to load.
MIN_STARTUP_SECONDS = 300


@cache
def flag_variables() -> frozenset[str]:
    """ENTITY_LLM_* names of every flag the server's parser has."""
    parser = build_parser(env={})
    return frozenset(
        ENV_PREFIX + action.dest.upper()
        for action in parser._actions
        if any(option.startswith("--") for option in action.option_strings) and action.dest != "help"
    )


def configured(env: Mapping[str, str], where: str) -> dict[str, Any]:
    """The ServerConfig fields `env` gives the server (flags unset), or fail saying why it refuses."""
    ours = {name: value for name, value in env.items() if name.startswith(ENV_PREFIX)}
    refusal = io.StringIO()
    try:
        with contextlib.redirect_stderr(refusal):
            config = dataclasses.asdict(parse_config([], env=ours))
    except SystemExit:
        why = (refusal.getvalue().strip().splitlines() or ["(nothing said)"])[-1]  # argparse's "error: ..." line
        pytest.fail(f"{where}: the server refuses these settings: {why}")
    # argparse checks `choices` only on the command line, not on defaults, and
    # the variables arrive as defaults: a misspelt choice would pass unnoticed.
    for action in build_parser(env={})._actions:
        name = ENV_PREFIX + action.dest.upper()
        if action.choices is not None and name in ours:
            assert config[action.dest] in action.choices, (
                f"{where}: {name}={ours[name]} is not one of {list(action.choices)}"
            )
    return config


def field(config: Mapping[str, Any], name: str, where: str) -> Any:
    """One configured field, or fail naming the flag the server lacks."""
    assert name in config, f"{where}: the server has no --{name.replace('_', '-')} flag"
    return config[name]


# --- Kubernetes -------------------------------------------------------------


@cache
def documents() -> tuple[tuple[str, Any], ...]:
    """(file relative to deploy/kubernetes, document) for every YAML document there."""
    found = []
    for path in sorted(KUBERNETES.rglob("*.yaml")):
        with path.open(encoding="utf-8") as stream:
            found += [(path.relative_to(KUBERNETES).as_posix(), doc) for doc in yaml.safe_load_all(stream) if doc]
    return tuple(found)


def the(kind: str) -> Any:
    matches = [doc for _, doc in documents() if doc.get("kind") == kind]
    assert len(matches) == 1, f"deploy/kubernetes should hold one {kind}, found {len(matches)}"
    return matches[0]


def pod() -> Any:
    return the("Deployment")["spec"]["template"]


def server() -> Any:
    containers = pod()["spec"]["containers"]
    assert len(containers) == 1, f"the pod should run one container, the server; found {len(containers)}"
    return containers[0]


def pod_env() -> dict[str, str]:
    """The server container's variables that have literal values."""
    return {entry["name"]: entry["value"] for entry in server().get("env", []) if "value" in entry}


def pod_config() -> dict[str, Any]:
    return configured(pod_env(), "the Deployment's env")


def container_ports() -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in server().get("ports", []) if "name" in port}


def selects(selector: Mapping[str, str], what: str) -> None:
    labels = pod()["metadata"].get("labels", {})
    assert selector, f"{what} has an empty selector: it would match every pod in the namespace"
    missing = {key: value for key, value in selector.items() if labels.get(key) != value}
    assert not missing, f"{what} selects {missing}, which the Deployment's pods do not carry ({labels})"


def test_the_manifests_hold_each_object_once_and_kustomize_includes_every_file() -> None:
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        the(kind)
    listed: set[str] = set()
    for name, doc in documents():
        if doc.get("kind") not in ("Kustomization", "Component"):
            continue
        folder = PurePosixPath(name).parent
        for resource in doc.get("resources", []):
            path = (folder / resource).as_posix()
            assert (KUBERNETES / path).is_file(), f"{name} lists {resource}, which does not exist"
            listed.add(path)
        for component in doc.get("components", []):
            assert (KUBERNETES / folder / component / "kustomization.yaml").is_file(), f"{name}: no {component}"
    manifests = {name for name, doc in documents() if doc.get("kind") not in ("Kustomization", "Component")}
    assert manifests <= listed, f"no kustomization includes {sorted(manifests - listed)}"
    base = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text(encoding="utf-8"))
    kinds = {doc["kind"] for name, doc in documents() if name in base["resources"]}
    assert {"Deployment", "Service", "PodDisruptionBudget"} <= kinds, f"kubectl apply -k deploys only {kinds}"


def test_every_pod_variable_is_a_server_flag_or_a_known_outside_one() -> None:
    for entry in server().get("env", []):
        name = entry["name"]
        if name.startswith(ENV_PREFIX):
            assert name in flag_variables(), f"the Deployment sets {name}, but the server has no such flag"
        else:
            assert name in OTHER_VARIABLES or name.startswith(OTHER_PREFIXES), (
                f"the Deployment sets {name}: the server is configured by {ENV_PREFIX}* variables only"
            )
        assert "valueFrom" in entry or isinstance(entry.get("value"), str), (
            f"{name}'s value {entry.get('value')!r} is not a string: Kubernetes rejects the manifest"
        )


def test_the_pod_settings_parse() -> None:
    config = pod_config()
    assert config["host"] in ("0.0.0.0", "[::]"), f"the server listens on {config['host']}, not every interface"


def test_the_container_ports_are_the_ports_the_server_is_told_to_use() -> None:
    config, ports = pod_config(), container_ports()
    for name, flag in PORTS.items():
        configured_port = field(config, flag, "the Deployment")
        assert configured_port, f"{ENV_PREFIX}{flag.upper()} is unset or 0: the {name} port would be off"
        assert ports.get(name) == configured_port, (
            f"the container port named {name} is {ports.get(name)}, "
            f"but {ENV_PREFIX}{flag.upper()} makes the server listen on {configured_port}"
        )
    assert len(set(ports.values())) == len(ports), f"two container ports share a number: {ports}"


def test_probes_ask_grpc_health_on_the_plaintext_health_port() -> None:
    health_port = field(pod_config(), "health_port", "the probes")
    container = server()
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe is not None, f"the server container has no {kind}"
        others = {"httpGet", "tcpSocket", "exec"} & probe.keys()
        assert not others, f"{kind} should be a gRPC health probe, not {sorted(others)}"
        assert "grpc" in probe, f"{kind} is not a gRPC probe"
        assert probe["grpc"]["port"] == health_port, (
            f"{kind} probes port {probe['grpc']['port']}, not the health port {health_port} "
            "(with mutual TLS on the main port, the kubelet could not connect there)"
        )
    readiness = container["readinessProbe"]["grpc"].get("service", "")
    assert readiness == LLM_SERVICE, f"readiness asks for service {readiness!r}, not {LLM_SERVICE}"
    liveness = container["livenessProbe"]["grpc"].get("service", "")
    assert liveness == "", f"liveness asks for {liveness!r}, not the whole server ('')"
    startup = container["startupProbe"]
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert budget >= MIN_STARTUP_SECONDS, (
        f"the startup probe gives a model {budget}s to load: the liveness probe would restart it mid-load"
    )


def test_the_pod_outlasts_the_servers_drain() -> None:
    grace = pod()["spec"].get("terminationGracePeriodSeconds", KUBERNETES_TERMINATION_GRACE)
    drain = pod_config()["shutdown_grace"]
    assert grace > drain, (
        f"terminationGracePeriodSeconds {grace} does not exceed the shutdown grace {drain}s: "
        "the kubelet would kill streams the server means to let finish"
    )


def test_kubernetes_service_links_cannot_set_server_variables() -> None:
    # A Service named entity-llm-metrics would inject ENTITY_LLM_METRICS_PORT=tcp://...
    assert pod()["spec"].get("enableServiceLinks") is False, (
        "enableServiceLinks is not false: Kubernetes' <SERVICE>_PORT variables share the server's prefix"
    )


def test_the_server_runs_unprivileged_on_a_read_only_filesystem() -> None:
    spec, container = pod()["spec"], server()
    pod_security, security = spec.get("securityContext", {}), container.get("securityContext", {})
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, "runAsNonRoot is not set"
    assert security.get("readOnlyRootFilesystem") is True, "the root filesystem is writable"
    assert security.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation is not false"
    assert "ALL" in security.get("capabilities", {}).get("drop", []), "capabilities are not all dropped"
    mounts = [entry["mountPath"] for entry in container.get("volumeMounts", [])]
    assert "/tmp" in mounts, "nothing writable is mounted on /tmp"


def test_the_service_is_headless_on_the_grpc_port_and_selects_the_pods() -> None:
    service = the("Service")
    assert service["spec"].get("clusterIP") == "None", (
        "the Service is not headless (clusterIP: None): clients would balance connections, not calls"
    )
    selects(service["spec"]["selector"], "the Service")
    ports = {port.get("name"): port for port in service["spec"]["ports"]}
    assert "grpc" in ports, f"the Service has no port named grpc: {sorted(ports)}"
    grpc_port = container_ports()["grpc"]
    # Headless: clients dial the pods' addresses, so no port is translated.
    assert ports["grpc"]["port"] == grpc_port, f"the Service's grpc port is not the container's {grpc_port}"
    assert ports["grpc"].get("targetPort", grpc_port) in ("grpc", grpc_port), "targetPort is not the grpc port"


def test_the_deployment_and_the_disruption_budget_select_the_pods() -> None:
    deployment, budget = the("Deployment"), the("PodDisruptionBudget")
    selects(deployment["spec"]["selector"]["matchLabels"], "the Deployment")
    selects(budget["spec"]["selector"]["matchLabels"], "the PodDisruptionBudget")
    for constraint in pod()["spec"].get("topologySpreadConstraints", []):
        selects(constraint["labelSelector"]["matchLabels"], "a topology spread constraint")
    replicas = deployment["spec"].get("replicas", 1)
    assert replicas >= 2, f"{replicas} replica: a drain or a node loss leaves nothing serving"
    allowed = budget["spec"].get("maxUnavailable", replicas - budget["spec"].get("minAvailable", replicas))
    assert 1 <= allowed < replicas, f"the budget lets {allowed} of {replicas} pods go at once"


def test_the_autoscaler_scales_the_deployment_on_the_servers_queue_depth() -> None:
    hpa, deployment = the("HorizontalPodAutoscaler"), the("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"]), (
        f"the HPA scales {target['kind']} {target['name']}, not the server's Deployment"
    )
    metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert "entity_llm_queue_depth" in metrics, f"the HPA scales on {metrics}, not entity_llm_queue_depth"
    served = {family.name for family in Metrics().registry.collect()}
    missing = set(metrics) - served
    assert not missing, f"the HPA reads {sorted(missing)}, which the server does not export"
    assert hpa["spec"].get("minReplicas", 1) >= 2, "the HPA may scale down to a single pod"


# --- Dockerfiles --------------------------------------------------------------


def instructions(path: Path) -> list[list[tuple[str, str]]]:
    """Each stage's (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    stages: list[list[tuple[str, str]]] = [[]]
    logical = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if logical and line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        instruction, _, arguments = (logical + line).strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages[1:]


def final(path: Path) -> list[tuple[str, str]]:
    return instructions(path)[-1]


def image_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in final(path):
        if instruction != "ENV":
            continue
        words = shlex.split(arguments)
        if "=" not in words[0]:  # the legacy form: ENV NAME value
            env[words[0]] = " ".join(words[1:])
        else:
            for word in words:
                name, _, value = word.partition("=")
                env[name] = value
    return env


def only(path: Path, instruction: str) -> str:
    found = [arguments for name, arguments in final(path) if name == instruction]
    assert found, f"{path.name}'s image has no {instruction}"
    return found[-1]  # the last one is the one in force


@pytest.fixture(params=DOCKERFILES, ids=lambda path: path.name)
def dockerfile(request: pytest.FixtureRequest) -> Path:
    path: Path = request.param
    return path


def test_there_is_a_cpu_and_a_cuda_image() -> None:
    assert {path.name for path in DOCKERFILES} >= {"Dockerfile", "Dockerfile.cuda"}


def test_image_variables_are_server_flags_and_parse(dockerfile: Path) -> None:
    env = image_env(dockerfile)
    unknown = sorted(name for name in env if name.startswith(ENV_PREFIX) and name not in flag_variables())
    assert not unknown, f"{dockerfile.name} sets {unknown}, which name no server flag"
    configured(env, dockerfile.name)


def test_image_exposes_the_ports_it_configures(dockerfile: Path) -> None:
    config = configured(image_env(dockerfile), dockerfile.name)
    wanted = {field(config, flag, dockerfile.name) for flag in PORTS.values()}
    exposed = {int(word.split("/")[0]) for word in only(dockerfile, "EXPOSE").split()}
    assert 0 not in wanted, f"{dockerfile.name} leaves a port off: {wanted}"
    assert exposed == wanted, f"{dockerfile.name} exposes {sorted(exposed)} but the server listens on {sorted(wanted)}"
    assert wanted == set(container_ports().values()), "the image's ports differ from the Deployment's"


def test_image_runs_the_console_script_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    user = only(dockerfile, "USER").split(":")[0]
    assert user.isdigit(), f"{dockerfile.name}: USER {user} is not numeric (runAsNonRoot can verify only a number)"
    assert int(user) > 0, f"{dockerfile.name}: USER {user} is root"
    run_as = pod()["spec"].get("securityContext", {}).get("runAsUser")
    assert run_as in (None, int(user)), f"the Deployment runs as {run_as}, the image as {user}"
    entrypoint = json.loads(only(dockerfile, "ENTRYPOINT"))
    pyproject = tomllib.loads((ROOT / "packages/entity-llm-server/pyproject.toml").read_text(encoding="utf-8"))
    assert entrypoint == ["entity-llm-server"], f"{dockerfile.name}: ENTRYPOINT {entrypoint}"
    assert entrypoint[0] in pyproject["project"]["scripts"], "entity-llm-server is no longer a console script"


def test_image_caches_live_where_the_pod_mounts_writable_volumes(dockerfile: Path) -> None:
    env = image_env(dockerfile)
    mounts = [PurePosixPath(entry["mountPath"]) for entry in server().get("volumeMounts", [])]
    for name in ("HOME", "XDG_CACHE_HOME", "HF_HOME"):
        assert name in env, f"{dockerfile.name} does not set {name}"
        path = PurePosixPath(env[name])
        assert any(path.is_relative_to(mount) for mount in mounts), (
            f"{dockerfile.name}'s {name}={path} is on the read-only root filesystem in the Deployment"
        )


def test_image_build_copies_only_what_the_build_hooks_read(dockerfile: Path) -> None:
    copied = 0
    for stage in instructions(dockerfile):
        for instruction, arguments in stage:
            if instruction not in ("COPY", "ADD"):
                continue
            words = [word for word in shlex.split(arguments) if not word.startswith("--")]
            if any(word.startswith("--from") for word in shlex.split(arguments)):
                continue
            for source in words[:-1]:
                top = (PurePosixPath(source).parts or (".",))[0]
                assert top in BUILD_INPUTS, f"{dockerfile.name} copies {source}, outside {sorted(BUILD_INPUTS)}"
                assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
                copied += 1
    assert copied, f"{dockerfile.name} copies nothing from the repository"
    assert dockerfile.with_name(dockerfile.name + ".dockerignore").is_file(), (
        f"{dockerfile.name} has no {dockerfile.name}.dockerignore: the whole repository would be sent to the daemon"
    )


# --- Prose ----------------------------------------------------------------------


def deploy_texts() -> Iterator[Path]:
    return (path for path in sorted(DEPLOY.rglob("*")) if path.is_file())


def test_every_variable_deploy_mentions_is_a_server_flag() -> None:
    # Comments and the README too: a commented-out example is copied as it stands.
    pattern = re.compile(rf"\b{ENV_PREFIX}[A-Z0-9]+(?:_[A-Z0-9]+)*\b")
    unknown = {
        f"{path.relative_to(ROOT)}: {name}"
        for path in deploy_texts()
        for name in pattern.findall(path.read_text(encoding="utf-8"))
        if name not in flag_variables()
    }
    assert not unknown, f"these name no server flag: {sorted(unknown)}"
