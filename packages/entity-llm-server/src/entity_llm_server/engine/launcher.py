"""The engine process as the front end starts, waits for and stops it.

The front end sends it an `EngineSpec` (what to load), and it answers
`Ready` with the model's facts and its tokenizer once warmed up (see `ipc`):
the front end, which tokenizes and detokenizes, never imports torch.
`process.ProcessCore` talks to it once it runs; `worker` is its side.

Under tensor parallelism (`--tensor-parallel N`) one core is N engine
processes, its ranks: each is started the way torch.distributed expects
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment), loads its shard of the model, and runs the same batching loop
in lock-step with the others; the front end talks to rank 0, which owns the
queues (`placement` says which device each rank gets).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Pipe, wait
from typing import Any

from .base import BatchingUnsupportedError
from .core import ModelFacts
from .ipc import Failed, Ready
from .settings import BatchingSettings

log = logging.getLogger(__name__)

STOP_TIMEOUT = 45.0  # seconds a stopping engine process gets (its own stop waits up to 40)


class EngineProcessError(RuntimeError):
    """The engine process could not load its model or start."""


@dataclass(frozen=True, slots=True)
class Rank:
    """An engine process's place in its tensor-parallel group.

    Attributes:
        rank: its rank (0 owns the queues and talks to the front end).
        world_size: the ranks in the group.
        port: the group's rendezvous port on 127.0.0.1 (rank 0 listens).
        local_rank: the accelerator index it binds (its rank on a CPU).
    """

    rank: int
    world_size: int
    port: int
    local_rank: int

    def environment(self, device: str) -> dict[str, str]:
        """The variables torch.distributed reads at start-up."""
        env = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(self.port),
            # Set before the process group starts, as transformers' batching
            # asks (a NCCL group built with graph mixing on runs slower).
            "NCCL_GRAPH_MIXING_SUPPORT": "0",
        }
        if device == "cpu":
            # transformers picks the distributed backend from the machine's
            # accelerator: a CPU group on a GPU machine must not see the GPUs.
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the engine process loads: the arguments of `UnifiedLLMResource`, and how to log.

    `rank` is set for a rank of a tensor-parallel group, None for a whole model.
    `engine`: `auto` (continuous batching, or padded batches where it cannot
    run the model: a whole model only), `batching` (or fail), or `padded`.
    """

    model: str
    device: str
    dtype: str
    default_max_new_tokens: int
    batching: BatchingSettings
    log_level: str = "WARNING"
    log_format: str = "text"
    rank: Rank | None = None
    trust_remote_code: bool = False
    engine: str = "auto"


def placement(device: str, replicas: int = 1, tensor_parallel: int = 1) -> list[list[str]]:
    """Each engine process's device: one list per replica, one device per rank.

    `device` is one device for all (`cpu`; `cuda` gives the ranks of a
    tensor-parallel group, replica after replica, cuda:0, cuda:1, ...), one
    per replica, or one per process (replica after replica, rank after rank).
    Raises ValueError, its message starting "device", for a list that fits none.
    """
    devices = [d.strip() for d in device.split(",")]
    ranks = replicas * tensor_parallel
    if any(not d for d in devices):
        raise ValueError(f"device {device!r} has an empty entry")
    if len(devices) == ranks:
        return [devices[r * tensor_parallel : (r + 1) * tensor_parallel] for r in range(replicas)]
    if tensor_parallel == 1 and len(devices) in (1, replicas):
        return [[devices[r % len(devices)]] for r in range(replicas)]
    if len(devices) == 1 and tensor_parallel > 1:
        only = devices[0]
        if only in ("cpu", "cuda", "xpu"):
            if only == "cpu":
                return [["cpu"] * tensor_parallel for _ in range(replicas)]
            return [[f"{only}:{r * tensor_parallel + k}" for k in range(tensor_parallel)] for r in range(replicas)]
        raise ValueError(
            f"device {device!r} is one device for {tensor_parallel} tensor-parallel ranks, which need one each: "
            f"give a device type (cuda: the ranks take cuda:0, cuda:1, ...) or list {ranks} devices"
        )
    if tensor_parallel == 1:
        layout, each = f"{replicas} engine replicas", f"one per replica ({replicas})"
    else:
        layout, each = f"{replicas} x {tensor_parallel} tensor-parallel ranks", f"one per process ({ranks})"
    raise ValueError(f"device lists {len(devices)} devices for {layout}: give one, or {each}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a tensor-parallel group's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _kill_quietly(popen: subprocess.Popen[bytes]) -> None:
    if popen.poll() is None:
        with contextlib.suppress(OSError):
            popen.kill()


class EngineProcess:
    """A started engine process and the front end's end of its pipe."""

    def __init__(self, spec: EngineSpec) -> None:
        ours, theirs = Pipe(duplex=True)
        try:
            stdout: Any = sys.stderr.fileno()  # the child's prints must not mix into our stdout
        except (AttributeError, OSError, ValueError):  # a replaced stderr (pytest's capture)
            stdout = None
        env = None if spec.rank is None else {**os.environ, **spec.rank.environment(spec.device)}
        self.rank = 0 if spec.rank is None else spec.rank.rank
        self.engine = "batching"  # what it serves with, once Ready says
        self.tokenizer: Any = None  # the model's tokenizer, once the first rank's Ready brings it
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "entity_llm_server.engine.worker", str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            env=env,
        )
        theirs.close()
        self.conn = ours
        # An engine that nobody closes (a load abandoned half way) dies with its owner.
        weakref.finalize(self, _kill_quietly, self.popen)
        self.conn.send(spec)

    def wait_ready(self) -> ModelFacts:
        """Block until the model is loaded and warmed up (however long a download or
        a graph capture takes, as in process); its facts, or EngineProcessError."""
        return wait_ready([self])[0]

    def _answer(self) -> ModelFacts:
        """Its answer to the start, read now (its pipe is readable)."""
        name = "the engine process" if self.rank == 0 else f"tensor-parallel rank {self.rank}"
        try:
            message = self.conn.recv()
        except (EOFError, OSError) as exc:
            raise EngineProcessError(f"{name} {self.exit_status()} while starting") from exc
        match message:
            case Ready(facts, engine, tokenizer):
                self.engine = engine
                self.tokenizer = tokenizer
                return facts
            case Failed(reason, unsupported=True):
                raise BatchingUnsupportedError(reason)
            case Failed(reason):
                raise EngineProcessError(reason if self.rank == 0 else f"{name}: {reason}")
            case _:
                raise EngineProcessError(f"{name} sent {type(message).__name__} while starting")

    def exit_status(self, wait: float = 10) -> str:
        """How the engine process ended, for messages: "exited (code N)" or "was killed by SIGNAME"."""
        try:
            code = self.popen.wait(wait)
        except subprocess.TimeoutExpired:
            return "closed its pipe"
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited (code {code})"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """Stop the engine process now (blocking until it is gone) and close the pipe."""
        with contextlib.suppress(OSError):
            self.popen.kill()
        self.popen.wait()
        self.conn.close()

    def stop(self) -> None:
        """Wait for a stopping engine process (blocking), killing it past STOP_TIMEOUT."""
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("the engine process did not stop within %g s; killing it", STOP_TIMEOUT)
        self.kill()


def wait_ready(processes: Sequence[EngineProcess]) -> list[ModelFacts]:
    """Block until every engine process is loaded and warmed up; their facts, in order.

    They are waited for together: the first that fails (or dies) kills them
    all and raises EngineProcessError (BatchingUnsupportedError where its
    start-up probe failed), since the ranks of a tensor-parallel group would
    otherwise wait for a dead one for hours.
    """
    answers: dict[int, ModelFacts] = {}
    pending = {process.conn: i for i, process in enumerate(processes)}
    try:
        while pending:
            for conn in wait(list(pending)):
                index = pending.pop(conn)  # type: ignore[call-overload]  # wait() gives back what it got
                answers[index] = processes[index]._answer()
    except BaseException:
        for process in processes:
            process.kill()
        raise
    return [answers[i] for i in range(len(processes))]
