"""Hypothesis fuzzing of every request message: each call gets a status (never UNKNOWN or
INTERNAL, which would mean an unhandled error), and the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import save_adapter
from server.client import Client, finetune_request
from server.mock_engine import mock_model_config
from server.proto import coserve_pb2 as pb
from server.service import Limits

from server_support import mock_server

SERVICE = pb.DESCRIPTOR.services_by_name["Coserve"]
NAMES = ["adapter1", "job1", "x", "", "../x", "a" * 65, "ünï", "job1/..", " "]
PATHS = ["adapter1", "data.jsonl", "../etc", "/etc/passwd", ".", "", "a/../../b", "new/dir",
         "\x00", "link"]
STRINGS = st.one_of(st.sampled_from(NAMES + PATHS + ["q_proj", "adamw", "sgd", "cosine",
                                                     "skip", "refuse", "user", "assistant"]),
                    st.text(max_size=12))
INTS = st.one_of(st.integers(-3, 300), st.sampled_from([-(2**63), 2**63 - 1, 2**31, 10**9]))
# int32 fields take the int32 extremes (larger values cannot even be set on the message).
INT32S = st.one_of(st.integers(-3, 300), st.sampled_from([-(2**31), 2**31 - 1, 10**9]))
FLOATS = st.one_of(st.floats(-2.0, 2.0), st.sampled_from([0.0, 1e-3, 1e300, -1e300]),
                   st.floats(allow_nan=True, allow_infinity=True))


def _scalar(field: FieldDescriptor):
    t = field.type
    if t == FieldDescriptor.TYPE_INT32:
        return INT32S
    if t == FieldDescriptor.TYPE_INT64:
        return INTS
    if t == FieldDescriptor.TYPE_DOUBLE:
        return FLOATS
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return STRINGS
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values] + [99])
    raise NotImplementedError(field.full_name)


def _repeated(field: FieldDescriptor) -> bool:
    flag = getattr(field, "is_repeated", None)
    return flag if flag is not None else field.label == FieldDescriptor.LABEL_REPEATED


def message_strategy(descriptor, base=None, depth: int = 0):
    """Messages of this type: a random subset of fields of ``base`` (a valid request, so
    the fuzzing reaches past the first check) replaced by random values; nested messages
    are mutated the same way, to depth 3."""
    cls = message_factory.GetMessageClass(descriptor)
    base = base if base is not None else cls()
    fields = {}
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3:
                continue
            if _repeated(field):
                items = getattr(base, field.name)
                inner = message_strategy(field.message_type, items[0] if len(items) else None,
                                         depth + 1)
            else:
                inner = message_strategy(field.message_type, getattr(base, field.name),
                                         depth + 1)
        else:
            inner = _scalar(field)
        fields[field.name] = st.lists(inner, max_size=4) if _repeated(field) else inner

    def build(values: dict):
        msg = cls()
        msg.CopyFrom(base)
        for name, value in values.items():
            field = descriptor.fields_by_name[name]
            if isinstance(value, list):
                target = getattr(msg, name)
                del target[:]
                for item in value:
                    if field.type == FieldDescriptor.TYPE_MESSAGE:
                        target.add().CopyFrom(item)
                    else:
                        target.append(item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.fixed_dictionaries({}, optional=fields).map(build)


VALID_NAMES = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)


def valid_request(method: str, name: str):
    """A request of this method that succeeds (or nearly), to mutate from."""
    requests = {
        "Generate": pb.GenerateRequest(prompt_token_ids=[5, 6, 7], adapter="adapter1",
                                       sampling=pb.SamplingParams(max_tokens=4, top_p=0.9)),
        "SubmitFinetune": finetune_request(name, records=[
            {"prompt": "a", "completion": "b"}, {"text": "hello"},
            {"messages": [{"role": "user", "content": "hi"}]}][:2], max_steps=2),
        "GetJob": pb.GetJobRequest(name="job1"),
        "WatchJob": pb.WatchJobRequest(name="job1", interval_s=0.05),
        "CancelJob": pb.CancelJobRequest(name=name),
        "ListJobs": pb.ListJobsRequest(),
        "LoadAdapter": pb.LoadAdapterRequest(name=name, path="adapter1"),
        "UnloadAdapter": pb.UnloadAdapterRequest(name=name),
        "ListAdapters": pb.ListAdaptersRequest(),
        "ExportAdapter": pb.ExportAdapterRequest(name="adapter1", path=f"out/{name}"),
        "Profile": pb.ProfileRequest(dir=f"trace-{name}", steps=2),
    }
    return requests[method]


def request_strategy(method: str):
    descriptor = SERVICE.methods_by_name[method].input_type
    mutated = VALID_NAMES.flatmap(
        lambda name: message_strategy(descriptor, valid_request(method, name)))
    return st.one_of(mutated, message_strategy(descriptor))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    with mock_server(tmp, engine=dict(step_delay=0.0005, max_adapters=64),
                     limits=Limits(max_streams=16, max_queue=16, max_jobs=3)) as server, \
            Client(server.address) as client:
        save_adapter(LoraAdapter.zeros_b("a", LoraConfig(r=4), mock_model_config(), 0),
                     str(tmp / "adapters" / "adapter1"))
        (tmp / "data" / "data.jsonl").write_text('{"text": "hello"}\n')
        client.load_adapter("adapter1")
        client.submit_finetune(finetune_request("job1", records=[{"text": "abc"}], max_steps=2))
        yield server, client


def _check_still_serving(client: Client) -> None:
    c = client.generate([5, 6, 7], max_tokens=3, seed=1, timeout=30)
    assert c.result.completion_tokens == 3
    for job in client.list_jobs():  # fuzzed jobs must not pile up against the cap
        if job.state == pb.JOB_STATE_RUNNING:
            client.cancel_job(job.name)


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_request_gets_a_status(served, method):
    _, client = served
    descriptor = SERVICE.methods_by_name[method]
    call = getattr(client.stub, method)

    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request_strategy(method))
    def fuzz(request):
        try:
            response = call(request, timeout=20)
            if descriptor.server_streaming:
                for _ in response:
                    pass
        except grpc.RpcError as e:
            assert e.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL,
                                    grpc.StatusCode.DEADLINE_EXCEEDED), (request, e.details())
        _check_still_serving(client)

    fuzz()
    assert client.health() == "SERVING"


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_unparsable_bytes_are_invalid_argument(served, method):
    """Bytes that are no protobuf message (a bad field tag) are refused with
    INVALID_ARGUMENT naming the message type, by unary and streaming methods alike; grpc
    alone would answer UNKNOWN."""
    server, client = served
    streaming = SERVICE.methods_by_name[method].server_streaming
    with grpc.insecure_channel(server.address) as channel:
        make = channel.unary_stream if streaming else channel.unary_unary
        call = make(f"/{SERVICE.full_name}/{method}", request_serializer=None,
                    response_deserializer=None)
        with pytest.raises(grpc.RpcError) as caught:
            response = call(b"\xff\xff\x01", timeout=20)
            if streaming:
                list(response)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert SERVICE.methods_by_name[method].input_type.full_name in caught.value.details()
    _check_still_serving(client)
