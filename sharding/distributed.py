"""Multi-host runs: ``jax.distributed`` start-up and the leader/follower protocol.

Every process of a multi-host deployment (one per host, each owning its local
GPUs or TPU chips) builds the same ``Engine`` on the same global mesh and runs
the same jitted programs (SPMD). Only process 0 (the leader) schedules: it owns
the request queues, jobs and clocks. Each time the leader's engine is about to
change device state, it first broadcasts what it is about to do, and every
follower applies the same change to its own engine:

- a step with a ``TokenBatch`` (the numpy batch is broadcast),
- a backward piece (the ``BackwardPiece`` scalars),
- adapter loads, writes and unloads, job submissions and optimizer steps
  (the host-side arguments; the device work is then identical everywhere),
- ``Leader.run(fn, ...)``: any module-level function of the engine that every
  process must call together (gathering sharded arrays to host, say).

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
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import numpy as np

from sharding.gather import tree_to_host

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


def _follow_step(engine, batch, with_train: bool) -> None:
    trainer = engine.trainer
    train = None if trainer is None else trainer.buffers
    engine.kv, train, _ = engine._step(engine.model.params, engine._slots(), engine.kv, train,
                                       batch, with_train=with_train)
    if trainer is not None:
        trainer.buffers = train


def _follow_backward(engine, piece, num_layers: int, seq_len: int) -> None:
    trainer = engine.trainer
    trainer.buffers = trainer._backward(engine.model.params, engine.registry.table,
                                        trainer.buffers, piece, num_layers=num_layers,
                                        seq_len=seq_len)


def _follow_optimizer_step(engine, name: str, seqs: int, loss: float) -> None:
    run = engine.trainer.jobs[name]
    run.seqs_in_step, run.loss_in_step = seqs, loss
    engine.trainer._optimizer_step(run)


def _follow_method(engine, owner: str, method: str, args: tuple, kwargs: dict) -> Any:
    target = engine if owner == "engine" else getattr(engine, owner)
    args = tuple(engine.trainer.jobs[a.name] if isinstance(a, _JobRef) else a for a in args)
    return getattr(target, method)(*args, **kwargs)


class Leader:
    """Process 0's side: every device-state change of ``engine`` is first broadcast.

    Installs itself on the engine's jitted step, the trainer's backward piece, the
    adapter registry's load/write/unload and the trainer's submit/optimizer step
    (instance attributes: the classes are untouched). Nested changes (a slot write
    inside a job submission) are not sent twice: the follower repeats the outer call,
    which makes the same nested ones. ``close()`` (or leaving the ``with`` block)
    releases the followers.
    """

    def __init__(self, engine, channel: Channel | None = None):
        self.engine = engine
        self.channel = channel or Channel()
        self._depth = 0
        self._closed = False
        self._install()

    def __enter__(self) -> Leader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _outer(self, message: tuple) -> Iterator[None]:
        if self._depth == 0:
            self.channel.send(message)
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1

    def run(self, fn: Callable[..., T], *args) -> T:
        """Calls ``fn(engine, *args)`` on every process (``fn`` must be importable there:
        a module-level function) and returns the leader's result."""
        with self._outer(("run", fn, args)):
            return fn(self.engine, *args)

    def close(self) -> None:
        """Tells the followers to return from ``follow``."""
        if not self._closed:
            self._closed = True
            self.channel.send(("stop",))

    def _install(self) -> None:
        engine = self.engine
        step = engine._step

        def mirrored_step(params, slots, kv, train, batch, *, with_train):
            with self._outer(("run", _follow_step, (batch, with_train))):
                return step(params, slots, kv, train, batch, with_train=with_train)

        engine._step = mirrored_step
        registry, trainer = engine.registry, engine.trainer
        if registry is not None:
            for method in ("load", "write", "unload"):
                self._mirror_method(registry, "registry", method)
        if trainer is not None:
            backward = trainer._backward

            def mirrored_backward(params, slots, train, piece, *, num_layers, seq_len):
                with self._outer(("run", _follow_backward,
                                  (jax.tree.map(np.asarray, piece), num_layers, seq_len))):
                    return backward(params, slots, train, piece, num_layers=num_layers,
                                    seq_len=seq_len)

            trainer._backward = mirrored_backward
            for method in ("submit", "adapter_of"):
                self._mirror_method(trainer, "trainer", method)
            optimizer_step = trainer._optimizer_step

            def mirrored_optimizer_step(run):
                with self._outer(("run", _follow_optimizer_step,
                                  (run.spec.name, run.seqs_in_step, run.loss_in_step))):
                    return optimizer_step(run)

            trainer._optimizer_step = mirrored_optimizer_step

    def _mirror_method(self, target, owner: str, method: str) -> None:
        original = getattr(target, method)

        def mirrored(*args, **kwargs):
            sent = tuple(_by_name(a) for a in args)
            with self._outer(("run", _follow_method, (owner, method, sent, kwargs))):
                return original(*args, **kwargs)

        setattr(target, method, mirrored)


def _by_name(arg):
    """Trainer methods take a ``JobRun``; it travels as its job name."""
    spec = getattr(arg, "spec", None)
    return _JobRef(spec.name) if spec is not None and hasattr(arg, "opt_state") else arg


@dataclasses.dataclass(frozen=True)
class _JobRef:
    name: str


def follow(engine, channel: Channel | None = None) -> int:
    """Runs on every process but 0: applies the leader's changes to ``engine`` until the
    leader closes. Returns the number of messages applied.

    An exception raised by a change is logged and the loop goes on: the leader ran the
    same code on the same state and got the same exception (a refused adapter, say).
    """
    channel = channel or Channel()
    applied = 0
    while True:
        message = channel.receive()
        if message[0] == "stop":
            return applied
        _, fn, args = message
        try:
            fn(engine, *args)
        except Exception:  # a mirrored failure, see the docstring
            log.exception("follower: %s failed (the leader saw the same error)",
                          getattr(fn, "__name__", fn))
        applied += 1


def run_spmd(engine, leader_main: Callable[[Any], T]) -> T | None:
    """Runs ``leader_main(engine)`` on process 0 with every device change mirrored to the
    other processes, which follow until it returns (then get None). On a single process
    it is just ``leader_main(engine)``."""
    if jax.process_count() == 1:
        return leader_main(engine)
    if jax.process_index() == 0:
        with Leader(engine) as leader:
            engine.leader = leader  # for code that needs Leader.run (gathers)
            return leader_main(engine)
    follow(engine)
    return None


def call_everywhere(engine, fn: Callable[..., T], *args) -> T:
    """``fn(engine, *args)`` on every process when ``engine`` is led by ``run_spmd`` (through
    ``Leader.run``), else just here. For collective reads such as ``gather_to_host``."""
    leader = getattr(engine, "leader", None)
    return fn(engine, *args) if leader is None else leader.run(fn, *args)


def gather_to_host(tree: Any) -> Any:
    """Host copies of a tree of (possibly multi-host) arrays. Every process must call it
    (through ``Leader.run`` on the leader)."""
    return tree_to_host(tree)
