"""A deterministic stand-in for the engine: no model, no JAX computation.

It implements :class:`server.engine_api.ServingEngine` with the same validation, the
same error types (:mod:`coserve_jax.errors`) and the same bookkeeping as the real
engine (requests wait, run up to ``max_num_seqs`` per step, hold KV pages until they
finish or are aborted; finetuning jobs take optimizer steps, checkpoint and resume), so
the server's threading, limits, errors and shutdown can be tested on CPU in
milliseconds. Tokens are a fixed function of the prompt, the position and the seed:
:meth:`MockEngine.expected_output` says what a request will produce.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time

import numpy as np

from coserve_jax.config import ModelConfig, RopeConfig
from coserve_jax.engine import RequestOutput
from coserve_jax.errors import (
    AlreadyExists,
    CapacityExhausted,
    InUse,
    InvalidRequest,
    NotFound,
)
from coserve_jax.finetune.job import FinetuneJob, JobProgress
from coserve_jax.kv_cache import KVUsage
from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.sampling import MAX_SEED, SamplingParams

from .engine_api import Backend

VOCAB = 320  # like the embedded model: <pad> <s> </s>, then byte b is id 3 + b
BOS, EOS = 1, 2


def mock_model_config() -> ModelConfig:
    """A tiny Llama config: adapters read for the mock engine must have these shapes."""
    return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=16,
                       intermediate_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       head_dim=8, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
                       max_position_embeddings=512, tie_word_embeddings=False,
                       qkv_bias=False, o_bias=False, bos_token_id=BOS, eos_token_ids=(EOS,))


class ByteTokenizer:
    """The embedded model's byte-level scheme without the tokenizers library."""

    bos_token_id = BOS
    eos_token_id = EOS
    pad_token_id = 0
    chat_template = None
    all_special_ids = (0, BOS, EOS)
    added_tokens_decoder: dict = {}  # noqa: RUF012 (read-only, mirrors the HF attribute)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [3 + b for b in text.encode("utf-8")]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        special = {0: "<pad>", BOS: "<s>", EOS: "</s>"}
        out, pending = [], bytearray()
        for i in ids:
            if 3 <= i < 259:
                pending.append(i - 3)
                continue
            if i >= 259:  # unused ids, as in the embedded model's vocabulary
                continue
            out.append(pending.decode("utf-8", errors="replace"))
            pending = bytearray()
            if not skip_special_tokens:
                out.append(special.get(i, ""))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)


@dataclasses.dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    adapter: str | None
    output: list[int] = dataclasses.field(default_factory=list)
    pages: int = 0


@dataclasses.dataclass
class _Job:
    spec: FinetuneJob
    state: str = "running"
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    tokens_trained: int = 0
    started: float = dataclasses.field(default_factory=time.monotonic)
    error: str | None = None


class MockEngine:
    """Deterministic engine double. ``step_delay`` seconds of sleep per step stand in for
    device time; ``fail_at_step`` makes that step raise, as a device failure would."""

    def __init__(self, max_num_seqs: int = 16, num_pages: int = 512, page_size: int = 16,
                 max_model_len: int = 256, max_adapters: int = 4, max_lora_rank: int = 16,
                 max_train_len: int = 128, step_delay: float = 0.001,
                 fail_at_step: int | None = None):
        self.model_config = mock_model_config()
        self.max_num_seqs = max_num_seqs
        self.num_pages = num_pages
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_adapters = max_adapters
        self.max_lora_rank = max_lora_rank
        self.max_train_len = max_train_len
        self.step_delay = step_delay
        self.fail_at_step = fail_at_step
        self.num_steps = 0
        self.last_slo = None
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self._adapters: dict[str, LoraAdapter] = {}
        self._jobs: dict[str, _Job] = {}
        self._next_id = 0
        self.profiles: list[tuple[str, int]] = []
        """Every ``start_profile(log_dir, num_steps)`` call."""
        self.profile_steps_left = 0
        self.closed = False

    # ----- requests -------------------------------------------------------------------------

    @staticmethod
    def token_at(prompt: list[int], index: int, seed: int) -> int:
        """The ``index``-th output token of a prompt: never EOS, so only stops end early."""
        return 3 + (sum(prompt) * 31 + len(prompt) * 7 + index * 17 + seed * 13) % (VOCAB - 3)

    @staticmethod
    def logprobs_at(token: int, index: int, n: int) -> tuple[float, list[tuple[int, float]]]:
        """The logprob of the ``index``-th output token and the ``n`` top (id, logprob) pairs:
        the token itself is the most likely, the ids after it follow, each less likely."""
        best = -0.25 * (1 + index % 4)
        return best, [(3 + (token - 3 + j) % (VOCAB - 3), best - j) for j in range(n)]

    @classmethod
    def expected_output(cls, prompt: list[int], params: SamplingParams) -> list[int]:
        """What a request with these (seeded) parameters produces."""
        seed = params.seed or 0
        out = []
        for i in range(params.max_tokens):
            out.append(cls.token_at(prompt, i, seed))
            if out[-1] in params.stop_token_ids:
                break
        return out

    def add_request(self, prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, adapter: str | None = None,
                    slo=None, arrival_time: float | None = None) -> str:
        """As the engine's; ``slo`` and ``arrival_time`` are kept (``last_slo``) for tests."""
        self.last_slo = (slo, arrival_time)
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequest("params must be a SamplingParams")
        ids = list(prompt)
        if not ids:
            raise InvalidRequest("prompt is empty")
        for i, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int | np.integer):
                raise InvalidRequest(f"prompt token at index {i} is {t!r}, not an integer id")
            if not 0 <= t < VOCAB:
                raise InvalidRequest(f"prompt token id {t} at index {i} is outside the "
                                     f"vocabulary [0, {VOCAB})")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(f"prompt ({len(ids)} tokens) plus max_tokens "
                                 f"({params.max_tokens}) is {total}, beyond the model length "
                                 f"{self.max_model_len}")
        for t in params.stop_token_ids:
            if t >= VOCAB:
                raise InvalidRequest(f"stop token id {t} is outside the vocabulary")
        if -(-total // self.page_size) > self.num_pages:
            raise InvalidRequest(f"a sequence of {total} tokens could never fit the cache")
        if adapter is not None and adapter not in self._adapters and adapter not in self._jobs:
            raise InvalidRequest(f"unknown adapter {adapter!r}")
        request_id = str(self._next_id) if request_id is None else str(request_id)
        self._next_id += 1
        if request_id in self._requests:
            raise AlreadyExists(f"request id {request_id!r} is already in use")
        seed = params.seed if params.seed is not None else self._next_id % MAX_SEED
        req = _Request(request_id, [int(t) for t in ids], params, seed, adapter)
        self._requests[request_id] = req
        self.waiting.append(req)
        return request_id

    def abort(self, request_id: str) -> bool:
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        (self.running if req in self.running else self.waiting).remove(req)
        req.pages = 0
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running) or any(
            j.state == "running" for j in self._jobs.values())

    def kv_usage(self) -> KVUsage:
        reqs = [*self.running, *self.waiting]
        used = sum(r.pages for r in reqs)
        return KVUsage(total_pages=self.num_pages, used_pages=used, page_size=self.page_size,
                       num_sequences=sum(1 for r in reqs if r.pages))

    def step(self) -> list[RequestOutput]:
        self.num_steps += 1
        if self.profile_steps_left:
            self.profile_steps_left -= 1
        if self.fail_at_step is not None and self.num_steps >= self.fail_at_step:
            raise RuntimeError(f"simulated device failure at step {self.num_steps}")
        if self.step_delay:
            time.sleep(self.step_delay)
        free = self.num_pages - self.kv_usage().used_pages
        while self.waiting and len(self.running) < self.max_num_seqs:
            need = -(-(len(self.waiting[0].prompt) + 1) // self.page_size)
            if need > free:
                break
            req = self.waiting.pop(0)
            req.pages, free = need, free - need
            self.running.append(req)
        outputs = []
        for req in list(self.running):
            token = self.token_at(req.prompt, len(req.output), req.seed)
            req.output.append(token)
            req.pages = -(-(len(req.prompt) + len(req.output)) // self.page_size)
            reason = None
            if token in req.params.stop_token_ids:
                reason = "stop"
            elif len(req.output) >= req.params.max_tokens:
                reason = "length"
            if reason is not None:
                self.running.remove(req)
                del self._requests[req.request_id]
                req.pages = 0
            logprobs = top = None
            if req.params.logprobs is not None:
                logprobs, top = self.logprobs_at(token, len(req.output) - 1, req.params.logprobs)
            outputs.append(RequestOutput(req.request_id, [token], list(req.output),
                                         reason is not None, reason, None,
                                         None if logprobs is None else [logprobs],
                                         None if top is None else [top]))
        for name, job in self._jobs.items():
            if job.state == "running":
                self._train(name, job)
        return outputs

    # ----- profiling ------------------------------------------------------------------------

    def start_profile(self, log_dir: str, num_steps: int) -> None:
        """Records the call (no trace); refuses a second one while steps are left."""
        if num_steps < 1:
            raise InvalidRequest(f"num_steps must be positive, got {num_steps}")
        if self.profile_steps_left:
            raise InUse("a trace is already being captured")
        self.profiles.append((log_dir, num_steps))
        self.profile_steps_left = num_steps

    def close(self) -> None:
        """Ends a "trace" in progress; ``closed`` says it was called."""
        self.profile_steps_left = 0
        self.closed = True

    # ----- adapters -------------------------------------------------------------------------

    def load_adapter(self, adapter: LoraAdapter, replace: bool = False) -> None:
        if adapter.name in self._jobs:
            raise InUse(f"{adapter.name!r} is the adapter of a finetuning job")
        adapter.check_matches(self.model_config)
        if adapter.config.r > self.max_lora_rank:
            raise InvalidRequest(f"adapter {adapter.name!r} has rank {adapter.config.r}, "
                                 f"above the slot maximum {self.max_lora_rank}")
        if adapter.name in self._adapters and not replace:
            raise AlreadyExists(f"an adapter named {adapter.name!r} is already loaded")
        if adapter.name not in self._adapters and self._slots_used() >= self.max_adapters:
            raise CapacityExhausted(f"all {self.max_adapters} adapter slots are in use")
        self._adapters[adapter.name] = adapter

    def unload_adapter(self, name: str) -> None:
        if name in self._jobs:
            raise InUse(f"{name!r} is the adapter of a finetuning job")
        if name not in self._adapters:
            raise NotFound(f"no adapter named {name!r}")
        users = [r for r in [*self.running, *self.waiting] if r.adapter == name]
        if users:
            raise InUse(f"adapter {name!r} is in use by {len(users)} request(s)")
        del self._adapters[name]

    def adapters(self) -> list[str]:
        return sorted([*self._adapters, *self._jobs])

    def _slots_used(self) -> int:
        return len(self._adapters) + len(self._jobs)

    # ----- jobs -----------------------------------------------------------------------------

    def submit_job(self, job: FinetuneJob) -> JobProgress:
        if job.name in self._jobs or job.name in self._adapters:
            raise AlreadyExists(f"an adapter or job named {job.name!r} already exists")
        longest = max(len(s.tokens) for s in job.dataset)
        if longest > self.max_train_len:
            raise InvalidRequest(f"job {job.name!r} has a sequence of {longest} tokens; the "
                                 f"engine trains at most {self.max_train_len} "
                                 "(EngineConfig.max_train_len)")
        if job.lora.r > self.max_lora_rank:
            raise InvalidRequest(f"adapter {job.name!r} has rank {job.lora.r}, above the slot "
                                 f"maximum {self.max_lora_rank}")
        if self._slots_used() >= self.max_adapters:
            raise CapacityExhausted(f"all {self.max_adapters} adapter slots are in use")
        run = _Job(job)
        saved = self._restore(job)
        if saved is not None:
            run.step, run.losses, run.tokens_trained = (
                saved["step"], saved["losses"], saved["tokens_trained"])
        self._jobs[job.name] = run
        if run.step >= job.total_steps:
            self._finish(run)
        return self.job_progress(job.name)

    def job_progress(self, name: str) -> JobProgress:
        run = self._job(name)
        elapsed = max(time.monotonic() - run.started, 1e-9)
        return JobProgress(
            name=name, state=run.state, step=run.step, total_steps=run.spec.total_steps,
            loss=run.losses[-1] if run.losses else None, losses=list(run.losses),
            learning_rate=run.spec.optimizer.learning_rate, grad_norm=1.0 if run.step else None,
            tokens_trained=run.tokens_trained, tokens_per_s=run.tokens_trained / elapsed,
            epoch=run.step * run.spec.sequences_per_step // len(run.spec.dataset),
            error=run.error)

    def cancel_job(self, name: str) -> None:
        run = self._job(name)
        if run.state == "running":
            run.state = "cancelled"

    def trained_adapter(self, name: str) -> LoraAdapter:
        run = self._job(name)
        adapter = LoraAdapter.zeros_b(name, run.spec.lora, self.model_config, run.spec.seed)
        for b in adapter.b.values():  # B moves away from zero as the job trains
            b += np.float32(1e-3 * run.step)
        return adapter

    def checkpoint_job(self, name: str) -> int | None:
        """Saves a running job's progress now (what a drain asks for)."""
        run = self._job(name)
        if run.state != "running" or not run.spec.checkpoint_dir:
            return None
        self._save(run)
        return run.step

    def remove_job(self, name: str) -> None:
        """Forgets a job that is no longer running; its adapter slot is free again."""
        if self._job(name).state == "running":
            raise InUse(f"job {name!r} is running; cancel it first")
        del self._jobs[name]

    def _job(self, name: str) -> _Job:
        if name not in self._jobs:
            raise NotFound(f"no job named {name!r}")
        return self._jobs[name]

    def _train(self, name: str, run: _Job) -> None:
        """One optimizer step per engine step: a loss that falls smoothly, like a real run."""
        spec = run.spec
        run.step += 1
        run.losses.append(round(4.0 * math.exp(-run.step / 50.0) + 0.1, 6))
        start = (run.step - 1) * spec.sequences_per_step
        run.tokens_trained += sum(len(spec.dataset[(start + i) % len(spec.dataset)].tokens)
                                  for i in range(spec.sequences_per_step))
        every = spec.checkpoint_every
        if spec.checkpoint_dir and (run.step >= spec.total_steps
                                    or (every and run.step % every == 0)):
            self._save(run)
        if run.step >= spec.total_steps:
            self._finish(run)

    def _finish(self, run: _Job) -> None:
        run.state = "completed"
        if run.spec.export_dir:
            from coserve_jax.lora.peft_io import save_adapter

            save_adapter(self.trained_adapter(run.spec.name), run.spec.export_dir)

    @staticmethod
    def _save(run: _Job) -> None:
        directory = os.path.join(run.spec.checkpoint_dir, str(run.step))
        os.makedirs(run.spec.checkpoint_dir, exist_ok=True)
        state = {"step": run.step, "losses": run.losses, "tokens_trained": run.tokens_trained}
        with tempfile.NamedTemporaryFile("w", dir=run.spec.checkpoint_dir, delete=False) as f:
            json.dump(state, f)
        os.makedirs(directory, exist_ok=True)
        os.replace(f.name, os.path.join(directory, "state.json"))

    @staticmethod
    def _restore(job: FinetuneJob) -> dict | None:
        if not job.checkpoint_dir or not os.path.isdir(job.checkpoint_dir):
            return None
        steps = [int(d) for d in os.listdir(job.checkpoint_dir) if d.isdigit()
                 and os.path.isfile(os.path.join(job.checkpoint_dir, d, "state.json"))]
        if not steps:
            return None
        with open(os.path.join(job.checkpoint_dir, str(max(steps)), "state.json")) as f:
            return json.load(f)


def mock_backend(**engine_kwargs) -> Backend:
    """A :class:`Backend` around a :class:`MockEngine` (keyword arguments go to it)."""
    engine = MockEngine(**engine_kwargs)
    return Backend(engine=engine, tokenizer=ByteTokenizer(), model_config=engine.model_config,
                   max_lora_rank=engine.max_lora_rank, max_train_len=engine.max_train_len,
                   model_name="mock")
