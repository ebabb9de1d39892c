"""Command-line flags for sharded and multi-host serving, for ``coserve serve`` and scripts.

    parser = argparse.ArgumentParser()
    add_arguments(parser)                  # --mesh --coordinator-address --num-processes ...
    args = parser.parse_args()
    launch = setup(args)                   # jax.distributed (if several processes) + mesh
    model = load_model(path, mesh=launch.mesh)
    engine = Engine(model, config, mesh=launch.mesh)
    run_spmd(engine, serve)                # process 0 serves; the others follow its steps

``setup`` must run before anything touches a jax device: ``jax.distributed`` has
to start before the backends do.
"""

from __future__ import annotations

import argparse
import dataclasses

from jax.sharding import Mesh

from sharding.distributed import DistributedInfo, initialize_from_env_or_flags
from sharding.mesh import MeshConfig, make_mesh


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the mesh and ``jax.distributed`` flags (all optional; the defaults serve on one
    device of one process exactly as without them)."""
    group = parser.add_argument_group("devices and hosts")
    group.add_argument("--mesh", default=None,
                       help="device mesh: 'model=8' (tensor parallel over 8 devices), "
                            "'data=2,model=4', or a JSON file such as configs/mesh_model8.json; "
                            "default: one device, no sharding")
    group.add_argument("--coordinator-address", default=None,
                       help="host:port of process 0's jax.distributed coordinator (multi-host; "
                            "or $COSERVE_COORDINATOR_ADDRESS; found automatically under SLURM "
                            "and on TPU slices)")
    group.add_argument("--num-processes", type=int, default=None,
                       help="processes in the run, one per host ($COSERVE_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None,
                       help="this process's index; 0 runs the scheduler and the server "
                            "($COSERVE_PROCESS_ID)")
    group.add_argument("--local-device-ids", default=None,
                       help="comma-separated local accelerator ids this process uses "
                            "(default: all of this host's)")
    group.add_argument("--cluster", default="auto", choices=["auto", "jax", "none"],
                       help="auto: flags, then environment, then SLURM/TPU detection; jax: "
                            "jax's own cluster detection (Open MPI, Kubernetes, TPU); none: "
                            "single process")


@dataclasses.dataclass(frozen=True)
class Launch:
    """What ``setup`` started: the process's place in the run and the mesh (None without
    ``--mesh``)."""

    distributed: DistributedInfo
    mesh: Mesh | None
    mesh_config: MeshConfig | None

    @property
    def is_leader(self) -> bool:
        """Process 0: the one that schedules, serves gRPC and writes files."""
        return self.distributed.is_leader


def setup(args: argparse.Namespace) -> Launch:
    """Starts ``jax.distributed`` when several processes take part, then builds the mesh
    over all processes' devices."""
    local = None
    if getattr(args, "local_device_ids", None):
        local = [int(i) for i in str(args.local_device_ids).split(",")]
    info = initialize_from_env_or_flags(
        getattr(args, "coordinator_address", None), getattr(args, "num_processes", None),
        getattr(args, "process_id", None), local,
        cluster=getattr(args, "cluster", "auto"))
    spec = getattr(args, "mesh", None)
    if spec is None:
        if info.num_processes > 1:
            raise ValueError("a multi-process run needs --mesh (e.g. --mesh model=8 spans the "
                             "devices of every host)")
        return Launch(info, None, None)
    config = MeshConfig.parse(spec)
    return Launch(info, make_mesh(config), config)
