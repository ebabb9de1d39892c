"""Multi-host runs: ``jax.distributed`` start-up and the leader/follower protocol.

Every process of a multi-host deployment (one per host, each owning its local
GPUs or TPU chips) builds the same ``Engine`` on the same global mesh and runs
the same jitted programs (SPMD). Only process 0 (the leader) schedules: it owns
the request queues, jobs and clocks. Every change to device state is a command to
the engine's ``Runner`` (``coserve_jax.runner_commands``: a step with its numpy
batch, a backward piece, a slot write, a job's start, update, checkpoint or
gather...); the leader broadcasts each command before its runner executes it, and
every follower's runner executes the same command (``MIRRORED`` lists them).

Messages travel through ``multihost_utils.broadcast_one_to_all`` as pickles
padded to a power of two, so the broadcast compiles once per size class, not
once per message. Followers trust the leader (same deployment, same code); the
channel is not meant to cross a trust boundary.

Typical use (what ``coserve serve`` does)::

    info = initialize_from_env_or_flags(args.coordinator_address, args.num_processes,
                                        args.process_id)
    mesh = make_mesh(MeshConfig.parse(args.mesh))
    engine = Engine(load_model(path, mesh=mesh), config, mesh=mesh)
    run_spmd(engine, lambda eng: serve_forever(eng))  # followers return when it ends
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import re
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np

from coserve_jax.runner_commands import (
    ApplyUpdate,
    DropJob,
    DropSampleParts,
    GatherJob,
    GatherSlotGrads,
    RestoreJob,
    RunBackwardPiece,
    RunSamplePart,
    RunStep,
    RunWholeSample,
    SaveJob,
    StartJob,
    WriteSlot,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# Our own variables come first; JAX_* are the names jax documents for the same values.
ENV_COORDINATOR = ("COSERVE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
ENV_NUM_PROCESSES = ("COSERVE_NUM_PROCESSES", "JAX_NUM_PROCESSES")
ENV_PROCESS_ID = ("COSERVE_PROCESS_ID", "JAX_PROCESS_ID")
_MIN_MESSAGE = 1024


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """How this process was started."""

    process_id: int
    num_processes: int
    coordinator_address: str | None
    """None for a single-process run."""
    source: str
    """Where the settings came from: ``flags``, ``env``, ``slurm``, ``jax`` (jax's own
    cluster detection, e.g. a TPU pod) or ``single`` (no distributed runtime)."""

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0


def _env(names: tuple[str, ...]) -> str | None:
    return next((os.environ[n] for n in names if os.environ.get(n)), None)


def _int(value: str | int | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def initialize_from_env_or_flags(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    *,
    cluster: str = "auto",
    initialization_timeout: int = 300,
) -> DistributedInfo:
    """Starts ``jax.distributed`` when this is one process of several; call it before
    anything touches a jax device.

    Settings are taken, first found wins, from: the arguments (``--coordinator-address
    --num-processes --process-id``); ``COSERVE_COORDINATOR_ADDRESS /
    COSERVE_NUM_PROCESSES / COSERVE_PROCESS_ID`` (or the ``JAX_`` names); SLURM
    (``srun`` with one task per node: coordinator on the first node of the step,
    ``SLURM_NTASKS`` processes, ``SLURM_PROCID``; each process keeps all of its node's
    GPUs); on a multi-host TPU slice jax's own detection (``cluster="jax"`` forces it,
    e.g. for Open MPI or Kubernetes). With none of these it is a single process and
    nothing is started. ``cluster="none"`` also skips detection.

    CPU processes (tests, dry runs) exchange collectives through gloo.
    """
    if cluster not in ("auto", "jax", "none"):
        raise ValueError(f"cluster must be auto, jax or none, got {cluster!r}")
    if jax.distributed.is_initialized():
        return DistributedInfo(jax.process_index(), jax.process_count(),
                               coordinator_address, "already initialized")
    source = "flags"
    address = coordinator_address
    count = _int(num_processes, "num_processes")
    pid = _int(process_id, "process_id")
    if address is None and count is None and pid is None and cluster == "auto":
        address = _env(ENV_COORDINATOR)
        count = _int(_env(ENV_NUM_PROCESSES), "num_processes")
        pid = _int(_env(ENV_PROCESS_ID), "process_id")
        source = "env"
        if address is None and count is None and pid is None:
            address, count, pid, source = _from_slurm()
    if cluster == "none" or (address is None and count is None and pid is None
                             and not (cluster == "jax" or _tpu_pod())):
        return DistributedInfo(0, 1, None, "single")
    if cluster == "jax" or (address is None and count is None and pid is None):
        source = "jax"
    elif count == 1:
        return DistributedInfo(0, 1, None, "single")
    elif None in (address, count, pid):
        raise ValueError("a multi-process run needs a coordinator address, a process count "
                         f"and a process id; got {address!r}, {count!r}, {pid!r}")
    _use_gloo_on_cpu()
    kwargs: dict[str, Any] = {"initialization_timeout": initialization_timeout}
    if source != "jax":
        kwargs |= {"coordinator_address": address, "num_processes": count, "process_id": pid,
                   # Our settings are complete: keep jax from second-guessing them (its
                   # SLURM detection would pin each process to one GPU).
                   "cluster_detection_method": "deactivate"}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    info = DistributedInfo(jax.process_index(), jax.process_count(), address, source)
    log.info("jax.distributed: process %d of %d (%s)", info.process_id, info.num_processes,
             info.source)
    return info


def _from_slurm() -> tuple[str | None, int | None, int | None, str]:
    """Coordinator, process count and id of a SLURM step with several tasks.

    The coordinator is the step's first node, on a port derived from the job id as jax's
    own SLURM support does (``COSERVE_COORDINATOR_PORT`` overrides it)."""
    tasks = _int(os.environ.get("SLURM_NTASKS"), "SLURM_NTASKS")
    if "SLURM_JOB_ID" not in os.environ or tasks in (None, 1):
        return None, None, None, "single"
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST", "")
    # "gpu[007-010,012]" -> "gpu007"; "a1,b2" -> "a1"
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodes)
    if m is None:
        raise ValueError(f"cannot read the first node of SLURM node list {nodes!r}")
    host = m.group(1) + (m.group(2) or "")
    port = os.environ.get("COSERVE_COORDINATOR_PORT") or str(
        int(os.environ["SLURM_JOB_ID"]) % 4096 + 61440)
    return f"{host}:{port}", tasks, int(os.environ["SLURM_PROCID"]), "slurm"


def _tpu_pod() -> bool:
    """A multi-host TPU slice (several worker hostnames), which jax configures itself."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES")
    return bool(hosts) and len(hosts.split(",")) > 1


def _use_gloo_on_cpu() -> None:
    # jax 0.10 defaults to gloo already; older and newer releases have varied, and without
    # a CPU collectives implementation cross-process CPU programs fail at run time.
    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


# ----- the channel ---------------------------------------------------------------------------


class Channel:
    """Broadcasts picklable messages from process 0 to all processes."""

    def send(self, message: Any) -> None:
        """Leader only: broadcast ``message``."""
        if jax.process_index() != 0:
            raise RuntimeError("only process 0 sends")
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self._broadcast(payload)

    def receive(self) -> Any:
        """Followers: the next message process 0 sends."""
        return pickle.loads(self._broadcast(None))

    @staticmethod
    def _broadcast(payload: bytes | None) -> bytes:
        from jax.experimental import multihost_utils

        source = payload is not None
        size = len(payload) if source else 0
        header = multihost_utils.broadcast_one_to_all(np.array([size], np.int32),
                                                      is_source=source)
        size = int(header[0])
        # Pad to a power of two: the broadcast compiles once per size class.
        padded = max(_MIN_MESSAGE, 1 << (size - 1).bit_length())
        buf = np.zeros(padded, np.uint8)
        if source:
            buf[:size] = np.frombuffer(payload, np.uint8)
        out = multihost_utils.broadcast_one_to_all(buf, is_source=source)
        return np.asarray(out)[:size].tobytes()


# ----- leader and followers ------------------------------------------------------------------


MIRRORED = (RunStep, RunBackwardPiece, RunWholeSample, RunSamplePart, DropSampleParts,
            WriteSlot, StartJob, RestoreJob, ApplyUpdate, SaveJob, DropJob, GatherJob,
            GatherSlotGrads)
"""The runner commands the followers apply (all of ``runner_commands.COMMANDS``: a test
fails if one is missing, and the leader refuses to send one that is not here)."""


class Leader:
    """Process 0's side: every command its engine's runner executes is first broadcast.

    The runner is the one owner of device state and ``Runner.execute`` its one door, so
    hooking that door (``runner.mirror``) mirrors every device change, the gathers and
    checkpoint saves that every process must join included. ``close()`` (or leaving the
    ``with`` block) releases the followers.
    """

    def __init__(self, runner, channel: Channel | None = None):
        self.runner = runner
        self.channel = channel or Channel()
        self._closed = False
        runner.mirror = self.send

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, command) -> None:
        """Broadcasts one runner command (the runner then executes it here)."""
        if not isinstance(command, MIRRORED):
            raise TypeError(f"{type(command).__name__} is not mirrored to the followers; "
                            f"add it to sharding.distributed.MIRRORED")
        self.channel.send(("command", command))

    def close(self) -> None:
        """Tells the followers to return from ``follow``."""
        if not self._closed:
            self._closed = True
            self.runner.mirror = None
            self.channel.send(("stop",))


def follow(runner, channel: Channel | None = None) -> int:
    """Runs on every process but 0: executes the leader's runner commands on ``runner``
    until the leader closes. Returns the number of commands applied.

    An exception raised by a command is logged and the loop goes on: the leader ran the
    same command on the same state and got the same exception.
    """
    channel = channel or Channel()
    applied = 0
    while True:
        message = channel.receive()
        if message[0] == "stop":
            return applied
        command = message[1]
        if not isinstance(command, MIRRORED):
            raise TypeError(f"the leader sent {type(command).__name__}, which is not mirrored")
        try:
            runner.execute(command)
        except Exception:  # a mirrored failure, see the docstring
            log.exception("follower: %s failed (the leader saw the same error)",
                          type(command).__name__)
        applied += 1


def run_spmd(engine, leader_main: Callable[[Any], T]) -> T | None:
    """Runs ``leader_main(engine)`` on process 0 with every runner command mirrored to the
    other processes, which follow until it returns (then get None). On a single process
    it is just ``leader_main(engine)``."""
    if jax.process_count() == 1:
        return leader_main(engine)
    if jax.process_index() == 0:
        with Leader(engine.runner):
            return leader_main(engine)
    follow(engine.runner)
    return None
