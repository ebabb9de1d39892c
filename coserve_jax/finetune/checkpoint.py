"""Durable job progress with orbax: adapter, optimizer state, data position, RNG seed, step.

Orbax writes each checkpoint into a temporary directory and renames it when
complete, so a process killed mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp


class JobCheckpointer:
    """Saves and restores one job's state under ``directory``."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                                 enable_async_checkpointing=False),
        )

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta)))
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, params_like, opt_state_like):
        """(params, opt_state, meta) of the latest checkpoint, or None if there is none."""
        step = self._manager.latest_step()
        if step is None:
            return None
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore({"params": params_like, "opt_state": opt_state_like}),
            meta=ocp.args.JsonRestore()))
        return restored.state["params"], restored.state["opt_state"], restored.meta

    def close(self) -> None:
        self._manager.close()
