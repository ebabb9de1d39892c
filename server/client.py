"""A small synchronous client of the coserve.v1 API (the CLI, the demo and tests use it)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .proto import coserve_pb2 as pb
from .proto import coserve_pb2_grpc as pb_grpc

JOB_STATE_NAMES = {v: k for k, v in {
    "queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING,
    "completed": pb.JOB_STATE_COMPLETED, "cancelled": pb.JOB_STATE_CANCELLED,
    "failed": pb.JOB_STATE_FAILED, "unspecified": pb.JOB_STATE_UNSPECIFIED}.items()}
TERMINAL = (pb.JOB_STATE_COMPLETED, pb.JOB_STATE_CANCELLED, pb.JOB_STATE_FAILED)


@dataclasses.dataclass
class Completion:
    """A whole streamed generation."""

    request_id: str
    token_ids: list[int]
    text: str
    result: pb.GenerateResult
    num_messages: int


def generate_request(prompt: str | list[int], *, max_tokens: int | None = 16,
                     temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
                     seed: int | None = None, stop_token_ids=(), ignore_eos: bool = False,
                     adapter: str = "", add_bos: bool = False, ttft_s: float = 0.0,
                     tpot_s: float = 0.0, request_id: str = "") -> pb.GenerateRequest:
    sampling = pb.SamplingParams(temperature=temperature, top_k=top_k,
                                 stop_token_ids=list(stop_token_ids), ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = pb.GenerateRequest(sampling=sampling, adapter=adapter, add_bos=add_bos,
                                 slo=pb.SloTargets(ttft_s=ttft_s, tpot_s=tpot_s),
                                 request_id=request_id)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        request.prompt_token_ids.extend(prompt)
    return request


def finetune_request(name: str, *, records: list[dict] | None = None,
                     dataset_path: str | None = None, r: int = 8, lora_alpha: float = 0.0,
                     target_modules=(), learning_rate: float = 1e-3,
                     optimizer: str = "adamw", schedule: str = "constant",
                     max_steps: int = 0, epochs: int = 0, sequences_per_step: int = 0,
                     max_seq_len: int = 0, checkpoint_every: int = 0,
                     seed: int = 0) -> pb.SubmitFinetuneRequest:
    """A job request from JSONL-style records (or a server-side dataset path)."""
    request = pb.SubmitFinetuneRequest(
        name=name, lora=pb.LoraSpec(r=r, lora_alpha=lora_alpha,
                                    target_modules=list(target_modules)),
        optimizer=pb.OptimizerSpec(name=optimizer, learning_rate=learning_rate,
                                   schedule=schedule),
        max_steps=max_steps, epochs=epochs, sequences_per_step=sequences_per_step,
        max_seq_len=max_seq_len, checkpoint_every=checkpoint_every, seed=seed)
    if (records is None) == (dataset_path is None):
        raise ValueError("give records or dataset_path")
    if dataset_path is not None:
        request.dataset_path = dataset_path
        return request
    for record in records:
        sample = request.samples.samples.add()
        if set(record) == {"text"}:
            sample.text = record["text"]
        elif set(record) == {"prompt", "completion"}:
            sample.prompt_completion.prompt = record["prompt"]
            sample.prompt_completion.completion = record["completion"]
        elif set(record) == {"messages"}:
            for m in record["messages"]:
                sample.conversation.messages.add(role=m["role"], content=m["content"])
        else:
            raise ValueError(f"record with fields {sorted(record)} is not text, "
                             "prompt/completion or messages")
    return request


class Client:
    """A channel to one server, with the caller's token on every call."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 server_name: str | None = None):
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls_ca or tls_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls_ca) if tls_ca else None,
                private_key=_read(tls_key) if tls_key else None,
                certificate_chain=_read(tls_cert) if tls_cert else None)
            self.channel = grpc.secure_channel(address, credentials, options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.CoserveStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    # ----- generation -----------------------------------------------------------------------

    def stream(self, request: pb.GenerateRequest, timeout: float | None = None):
        """The streaming call (iterate it for responses; ``.cancel()`` aborts it)."""
        return self.stub.Generate(request, timeout=timeout, metadata=self.metadata)

    def generate(self, prompt: str | list[int], timeout: float | None = None,
                 **kwargs) -> Completion:
        """Runs one generation to the end (see :func:`generate_request` for the options)."""
        return collect(self.stream(generate_request(prompt, **kwargs), timeout))

    # ----- jobs -----------------------------------------------------------------------------

    def submit_finetune(self, request: pb.SubmitFinetuneRequest,
                        timeout: float | None = None) -> pb.Job:
        return self.stub.SubmitFinetune(request, timeout=timeout, metadata=self.metadata)

    def get_job(self, name: str, timeout: float | None = None) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(name=name), timeout=timeout,
                                metadata=self.metadata)

    def watch_job(self, name: str, interval_s: float = 0.5,
                  timeout: float | None = None) -> Iterator[pb.Job]:
        return self.stub.WatchJob(pb.WatchJobRequest(name=name, interval_s=interval_s),
                                  timeout=timeout, metadata=self.metadata)

    def cancel_job(self, name: str, timeout: float | None = None) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(name=name), timeout=timeout,
                                   metadata=self.metadata)

    def list_jobs(self, timeout: float | None = None) -> list[pb.Job]:
        return list(self.stub.ListJobs(pb.ListJobsRequest(), timeout=timeout,
                                       metadata=self.metadata).jobs)

    # ----- adapters -------------------------------------------------------------------------

    def load_adapter(self, path: str, name: str = "", replace: bool = False,
                     timeout: float | None = None) -> pb.Adapter:
        return self.stub.LoadAdapter(pb.LoadAdapterRequest(name=name, path=path,
                                                           replace=replace),
                                     timeout=timeout, metadata=self.metadata)

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        self.stub.UnloadAdapter(pb.UnloadAdapterRequest(name=name), timeout=timeout,
                                metadata=self.metadata)

    def list_adapters(self, timeout: float | None = None) -> list[pb.Adapter]:
        return list(self.stub.ListAdapters(pb.ListAdaptersRequest(), timeout=timeout,
                                           metadata=self.metadata).adapters)

    def export_adapter(self, name: str, path: str, overwrite: bool = False,
                       timeout: float | None = None) -> str:
        return self.stub.ExportAdapter(pb.ExportAdapterRequest(name=name, path=path,
                                                               overwrite=overwrite),
                                       timeout=timeout, metadata=self.metadata).path

    def profile(self, dir: str, steps: int, timeout: float | None = None) -> str:
        """Starts a trace of the next ``steps`` engine steps into ``dir`` (profile root)."""
        return self.stub.Profile(pb.ProfileRequest(dir=dir, steps=steps), timeout=timeout,
                                 metadata=self.metadata).dir

    # ----- health ---------------------------------------------------------------------------

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """``SERVING``, ``NOT_SERVING``, ...: the standard grpc.health.v1 check."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service),
                                          timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def collect(responses) -> Completion:
    """Reads a Generate stream to its end."""
    request_id, ids, text, result, n = "", [], [], None, 0
    for message in responses:
        n += 1
        request_id = request_id or message.request_id
        ids.extend(message.token_ids)
        text.append(message.text)
        if message.HasField("result"):
            result = message.result
    if result is None:
        raise RuntimeError("the stream ended without a result")
    return Completion(request_id, ids, "".join(text), result, n)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
