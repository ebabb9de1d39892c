"""Fine-tuning jobs as OpenAI's API shows them, over the gRPC service's jobs.

An OpenAI job (``ftjob-...``) is one of the service's finetuning jobs: creating one
submits a ``SubmitFinetuneRequest`` (the training file's samples inline, so the job's
spec in the state directory is complete and it resumes after a restart like any gRPC
job) through :meth:`server.service.CoserveService.submit_job`, with the same tenant names,
caps and persistence. This module keeps only what the service does not: the OpenAI id,
the file and hyperparameters it was created with, and the loss of every step seen (for
``/events`` after a restart), in ``<state>/openai_jobs/<id>.json``.

The job's adapter is served under ``fine_tuned_model`` from the moment it is created:
completions can use it while it trains (with the weights of its latest optimizer step)
and after it finished.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import tempfile
import time

from coserve_jax.finetune.optim import OptimizerConfig

from .. import convert
from ..auth import internal_name
from ..paths import write_atomic
from ..proto import coserve_pb2 as pb
from ..service import CoserveService, JobRecord
from .errors import HttpError, from_exception
from .files import FileStore
from .schemas import FineTuningJobRequest, Hyperparameters

STATUS = {"queued": "queued", "running": "running", "completed": "succeeded",
          "cancelled": "cancelled", "failed": "failed"}
DEFAULT_BATCH_SIZE = 8
MAX_LIMIT = 100


@dataclasses.dataclass
class JobMeta:
    """What the HTTP door remembers about a job beside the service's record."""

    id: str
    tenant: str
    name: str
    """The service's job name: the adapter's name, i.e. ``fine_tuned_model``."""
    model: str
    training_file: str
    created_at: int
    hyperparameters: dict
    seed: int
    suffix: str | None = None
    finished_at: int | None = None
    losses: list[float] = dataclasses.field(default_factory=list)
    step_times: list[int] = dataclasses.field(default_factory=list)
    """When each step's loss was first seen (an event's ``created_at``)."""
    created: float = 0.0
    """``time.time()`` at creation, to the microsecond: the order of the job list."""


def _samples(records: list[dict]) -> pb.Samples:
    out = pb.Samples()
    for r in records:
        if "messages" in r:
            out.samples.add(conversation=pb.Conversation(messages=[
                pb.ChatMessage(role=m["role"], content=m["content"]) for m in r["messages"]]))
        elif "text" in r:
            out.samples.add(text=r["text"])
        else:
            out.samples.add(prompt_completion=pb.PromptCompletion(
                prompt=r["prompt"], completion=r["completion"]))
    return out


class JobStore:
    """OpenAI fine-tuning jobs of every tenant, persisted beside the service's jobs."""

    def __init__(self, service: CoserveService, files: FileStore, root: str | None,
                 model_id: str):
        self.service = service
        self.files = files
        self.root = root or tempfile.mkdtemp(prefix="coserve-jobs-")
        self.model_id = model_id
        self.jobs: dict[str, JobMeta] = {}
        os.makedirs(self.root, exist_ok=True)
        for name in sorted(os.listdir(self.root)):
            if name.endswith(".json"):
                with open(os.path.join(self.root, name)) as f:
                    meta = JobMeta(**json.load(f))
                self.jobs[meta.id] = meta

    def _save(self, meta: JobMeta) -> None:
        write_atomic(os.path.join(self.root, f"{meta.id}.json"),
                      json.dumps(dataclasses.asdict(meta)).encode())

    def _meta(self, tenant: str, job_id: str) -> JobMeta:
        meta = self.jobs.get(job_id)
        if meta is None or meta.tenant != tenant:
            raise HttpError(404, f"fine_tuning_job_id: no job {job_id!r}",
                            "fine_tuning_job_id", "job_not_found")
        return meta

    def _record(self, meta: JobMeta) -> JobRecord:
        return self.service.job_record(meta.tenant, meta.name)

    # ----- create ---------------------------------------------------------------------------

    async def create(self, tenant: str, body: FineTuningJobRequest) -> dict:
        if body.model != self.model_id:
            raise HttpError(400, f"model: fine-tuning starts from the base model "
                            f"{self.model_id!r}, got {body.model!r}", "model",
                            "model_not_available")
        if body.validation_file:
            raise HttpError(400, "validation_file is not supported", "validation_file",
                            "unsupported_value")
        records = self.files.records(tenant, body.training_file)
        hp = body.hyperparameters
        if hp is None and body.method is not None and body.method.supervised is not None:
            hp = body.method.supervised.hyperparameters
        hp = hp or Hyperparameters()
        epochs = 1 if hp.n_epochs == "auto" else hp.n_epochs
        batch = DEFAULT_BATCH_SIZE if hp.batch_size == "auto" else hp.batch_size
        multiplier = 1.0 if hp.learning_rate_multiplier == "auto" \
            else hp.learning_rate_multiplier
        if multiplier <= 0:
            raise HttpError(400, "hyperparameters.learning_rate_multiplier must be positive",
                            "hyperparameters.learning_rate_multiplier")
        opt = body.optimizer
        lora = body.lora
        base_lr = (opt.learning_rate if opt and opt.learning_rate
                   else OptimizerConfig().learning_rate)
        optimizer = pb.OptimizerSpec(
            name=opt.name if opt else "", learning_rate=base_lr * multiplier,
            schedule=opt.schedule if opt else "", warmup_steps=opt.warmup_steps if opt else 0,
            weight_decay=opt.weight_decay if opt else 0.0,
            momentum=opt.momentum if opt else 0.0)
        if opt is not None and opt.max_grad_norm is not None:
            optimizer.max_grad_norm = opt.max_grad_norm
        hex_id = secrets.token_hex(12)
        job_id = f"ftjob-{hex_id}"
        name = f"ft-{body.suffix}-{hex_id[:8]}" if body.suffix else f"ft-{hex_id[:12]}"
        try:
            internal_name(tenant, name, "suffix")  # the suffix must make a valid name
            request = pb.SubmitFinetuneRequest(
                name=name, samples=_samples(records), optimizer=optimizer,
                max_steps=body.max_steps or 0, epochs=epochs,
                sequences_per_step=batch, max_seq_len=body.max_seq_len or 0,
                checkpoint_every=body.checkpoint_every or 0, seed=body.seed or 0)
            if lora is not None:
                request.lora.CopyFrom(pb.LoraSpec(r=lora.r, lora_alpha=lora.lora_alpha,
                                                  target_modules=lora.target_modules or [],
                                                  use_rslora=lora.use_rslora))
            await self.service.submit_job(request, tenant)
        except Exception as e:
            error = from_exception(e)
            if error.message.startswith(("epochs", "sequences_per_step")):
                error.param = "hyperparameters"
            raise error from None
        meta = JobMeta(id=job_id, tenant=tenant, name=name, model=body.model,
                       training_file=body.training_file, created_at=int(time.time()),
                       hyperparameters={"n_epochs": epochs, "batch_size": batch,
                                        "learning_rate_multiplier": multiplier},
                       seed=body.seed or 0, suffix=body.suffix, created=time.time())
        self.jobs[job_id] = meta
        self._save(meta)
        return await self.job(tenant, job_id)

    # ----- read -----------------------------------------------------------------------------

    async def _refresh(self, meta: JobMeta) -> dict:
        """The job's progress; records newly seen step losses and the finish time."""
        record = self._record(meta)
        progress = await self.service.job_progress(record)
        if record.live:
            losses = await self.service.bridge.call(
                lambda e: list(e.job_progress(record.internal).losses))
        else:
            losses = meta.losses
        changed = False
        if len(losses) > len(meta.losses):
            now = int(time.time())
            meta.step_times += [now] * (len(losses) - len(meta.losses))
            meta.losses = [float(x) for x in losses]
            changed = True
        if progress.get("state") in convert.TERMINAL_STATES and meta.finished_at is None:
            meta.finished_at = int(time.time())
            changed = True
        if changed:
            self._save(meta)
        return progress

    def _object(self, meta: JobMeta, progress: dict) -> dict:
        state = progress.get("state", "failed")
        error = None
        if progress.get("error"):
            error = {"code": "job_failed", "message": progress["error"], "param": None}
        hp = meta.hyperparameters
        return {
            "id": meta.id, "object": "fine_tuning.job", "created_at": meta.created_at,
            "finished_at": meta.finished_at, "model": meta.model,
            "fine_tuned_model": meta.name, "organization_id": meta.tenant,
            "status": STATUS.get(state, state), "hyperparameters": hp,
            "training_file": meta.training_file, "validation_file": None,
            "result_files": [], "trained_tokens": progress.get("tokens_trained", 0),
            "error": error, "seed": meta.seed, "estimated_finish": None,
            "integrations": [], "user_provided_suffix": meta.suffix, "metadata": None,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            # Ours: progress beyond what OpenAI reports.
            "step": progress.get("step", 0), "total_steps": progress.get("total_steps", 0),
            "loss": meta.losses[-1] if meta.losses else None,
        }

    async def job(self, tenant: str, job_id: str) -> dict:
        meta = self._meta(tenant, job_id)
        return self._object(meta, await self._refresh(meta))

    async def list(self, tenant: str, after: str | None, limit: int) -> dict:
        mine = sorted((m for m in self.jobs.values() if m.tenant == tenant),
                      key=lambda m: (m.created, m.id), reverse=True)
        page = _page(mine, after, limit, lambda m: m.id, "after")
        return {"object": "list",
                "data": [self._object(m, await self._refresh(m)) for m in page["items"]],
                "has_more": page["has_more"]}

    async def cancel(self, tenant: str, job_id: str) -> dict:
        meta = self._meta(tenant, job_id)
        record = self._record(meta)
        if record.live and record.final is None:
            await self.service.bridge.call(lambda e: e.cancel_job(record.internal))
        return await self.job(tenant, job_id)

    async def events(self, tenant: str, job_id: str, after: str | None, limit: int) -> dict:
        """``job created``, a metrics event per optimizer step, the end; newest first."""
        meta = self._meta(tenant, job_id)
        progress = await self._refresh(meta)
        total = progress.get("total_steps", 0)
        events = [_event(meta, 0, meta.created_at, "message", f"Created fine-tuning job "
                         f"{meta.id} (adapter {meta.name!r})")]
        for step, (loss, when) in enumerate(zip(meta.losses, meta.step_times, strict=False),
                                            start=1):
            events.append(_event(meta, step, when, "metrics",
                                 f"Step {step}/{total}: training loss={loss:.4f}",
                                 {"step": step, "total_steps": total, "train_loss": loss}))
        state = progress.get("state")
        if state in convert.TERMINAL_STATES:
            message = {"completed": "The job has successfully completed",
                       "cancelled": "The job was cancelled"}.get(
                state, f"The job failed: {progress.get('error') or 'unknown error'}")
            events.append(_event(meta, len(meta.losses) + 1, meta.finished_at or 0,
                                 "message", message, level="info" if state != "failed"
                                 else "error"))
        events.reverse()
        page = _page(events, after, limit, lambda e: e["id"], "after")
        return {"object": "list", "data": page["items"], "has_more": page["has_more"]}

    async def checkpoints(self, tenant: str, job_id: str, after: str | None,
                          limit: int) -> dict:
        """The job's saved checkpoints (``checkpoint_every`` steps and the last), newest first."""
        meta = self._meta(tenant, job_id)
        await self._refresh(meta)
        record = self._record(meta)
        directory = os.path.join(record.directory or "", "checkpoint")
        steps = sorted((int(d) for d in os.listdir(directory) if d.isdigit()), reverse=True) \
            if record.directory and os.path.isdir(directory) else []
        items = []
        for step in steps:
            loss = meta.losses[step - 1] if 0 < step <= len(meta.losses) else None
            items.append({
                "id": f"ftckpt-{meta.id[6:]}-{step}", "object": "fine_tuning.job.checkpoint",
                "created_at": int(os.path.getmtime(os.path.join(directory, str(step)))),
                "fine_tuning_job_id": meta.id, "step_number": step,
                "fine_tuned_model_checkpoint": f"{meta.name}:step-{step}",
                "metrics": {"step": step, "train_loss": loss}})
        page = _page(items, after, limit, lambda c: c["id"], "after")
        return {"object": "list", "data": page["items"], "has_more": page["has_more"],
                "first_id": page["items"][0]["id"] if page["items"] else None,
                "last_id": page["items"][-1]["id"] if page["items"] else None}


def _event(meta: JobMeta, seq: int, when: int, kind: str, message: str,
           data: dict | None = None, level: str = "info") -> dict:
    return {"id": f"ftevent-{meta.id[6:]}-{seq}", "object": "fine_tuning.job.event",
            "created_at": when, "level": level, "message": message, "type": kind,
            "data": data or {}}


def _page(items: list, after: str | None, limit: int, key, param: str) -> dict:
    """Cursor pagination as OpenAI's lists do: the ``limit`` items after ``after``."""
    if not 1 <= limit <= MAX_LIMIT:
        raise HttpError(400, f"limit: must be in [1, {MAX_LIMIT}], got {limit}", "limit")
    start = 0
    if after is not None:
        ids = [key(item) for item in items]
        if after not in ids:
            raise HttpError(400, f"{param}: no item {after!r} in this list", param)
        start = ids.index(after) + 1
    return {"items": items[start:start + limit], "has_more": start + limit < len(items)}
