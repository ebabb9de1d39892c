"""The engine contract (:class:`server.engine_api.ServingEngine`): the real engine on the
embedded model and :class:`server.mock_engine.MockEngine` behave alike, method by method,
and raise the same :mod:`coserve_jax.errors` types in the same situations; and the
server maps each error type to its status without reading messages."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from coserve_jax import Engine, EngineConfig, FinetuneJob, LoraAdapter, LoraConfig
from coserve_jax.errors import (
    AdmissionError,
    AlreadyExists,
    CapacityExhausted,
    EngineError,
    InUse,
    InvalidRequest,
    NotFound,
)
from coserve_jax.finetune.data import Dataset, TrainSequence
from coserve_jax.sampling import SamplingParams
from server.bridge import EngineFailed
from server.engine_api import ServingEngine
from server.mock_engine import MockEngine
from server.service import ServiceError, classify

from support import tiny_model

# Small enough to compile quickly on CPU; two adapter slots, so capacity is reachable.
CONFIG = EngineConfig.flat(page_size=4, num_pages=64, max_num_seqs=2, max_num_batched_tokens=16,
                           min_token_bucket=8, min_seq_bucket=2, max_model_len=64,
                           max_adapters=2, max_lora_rank=8, max_train_seqs=1, max_train_len=32,
                           admission_control=False)


@pytest.fixture(params=["engine", "mock"])
def engine(request):
    """A fresh engine of each kind (the real one's step compiles once per engine)."""
    if request.param == "engine":
        engine = Engine(tiny_model(), CONFIG)
    else:
        c = CONFIG
        engine = MockEngine(max_num_seqs=c.buckets.max_num_seqs, num_pages=c.cache.num_pages,
                            page_size=c.cache.page_size, max_model_len=c.cache.max_model_len,
                            max_adapters=c.adapters.max_adapters,
                            max_lora_rank=c.adapters.max_lora_rank,
                            max_train_len=c.finetune.max_train_len, step_delay=0)
    yield engine
    engine.close()


def _model_config(engine):
    return engine.model.config if isinstance(engine, Engine) else engine.model_config


def _vocab(engine) -> int:
    return _model_config(engine).vocab_size


def _adapter(engine, name: str, r: int = 4) -> LoraAdapter:
    return LoraAdapter.zeros_b(name, LoraConfig(r=r), _model_config(engine), seed=0)


def _job(name: str, length: int = 12, max_steps: int = 1000) -> FinetuneJob:
    tokens = tuple(range(3, 3 + length))
    return FinetuneJob(name, Dataset([TrainSequence(tokens, (False,) + (True,) * (length - 1))]),
                       lora=LoraConfig(r=4), max_steps=max_steps)


def _run(engine) -> dict[str, list]:
    """Steps until nothing is left; every request's outputs, by request id."""
    outputs: dict[str, list] = {}
    for _ in range(200):
        if not engine.has_unfinished():
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("requests did not finish in 200 steps")


def test_is_a_serving_engine(engine):
    assert isinstance(engine, ServingEngine)


def test_add_request_errors(engine):
    vocab = _vocab(engine)
    params = SamplingParams(max_tokens=4)
    for prompt in ([], [5, vocab], [5, 1.5], [5, True]):
        with pytest.raises(InvalidRequest, match="prompt"):
            engine.add_request(prompt, params)
    with pytest.raises(InvalidRequest, match="beyond the model length"):
        engine.add_request([5] * 40, SamplingParams(max_tokens=40))
    with pytest.raises(InvalidRequest, match="stop token id"):
        engine.add_request([5, 6], SamplingParams(max_tokens=4, stop_token_ids=(vocab,)))
    with pytest.raises(InvalidRequest, match="params"):
        engine.add_request([5, 6], {"max_tokens": 4})
    with pytest.raises(InvalidRequest, match="unknown adapter 'nope'"):
        engine.add_request([5, 6], params, adapter="nope")
    assert engine.add_request([5, 6], params, request_id="r1") == "r1"
    with pytest.raises(AlreadyExists, match="'r1' is already in use"):
        engine.add_request([7, 8], params, request_id="r1")
    # Old callers catch the builtins.
    with pytest.raises(ValueError):
        engine.add_request([], params)

    assert engine.abort("unknown") is False
    assert engine.abort("r1") is True
    assert engine.abort("r1") is False
    assert not engine.has_unfinished()
    assert engine.kv_usage().used_pages == 0


def test_step_runs_requests_to_completion(engine):
    lengths = {"short": 3, "long": 6}
    for rid, n in lengths.items():
        assert engine.add_request([5, 9, 33, 70 + n], SamplingParams(max_tokens=n, ignore_eos=True),
                                  request_id=rid) == rid
    assert engine.has_unfinished()
    outputs = _run(engine)
    assert set(outputs) == set(lengths)
    for rid, outs in outputs.items():
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason == "length"
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == outs[-1].output_token_ids and len(tokens) == lengths[rid]
        assert all(0 <= t < _vocab(engine) for t in tokens)
    assert engine.kv_usage().used_pages == 0
    assert engine.abort("short") is False  # finished requests are forgotten


def test_adapter_errors(engine):
    engine.load_adapter(_adapter(engine, "a"))
    with pytest.raises(AlreadyExists, match="already loaded"):
        engine.load_adapter(_adapter(engine, "a"))
    engine.load_adapter(_adapter(engine, "a"), replace=True)
    with pytest.raises(InvalidRequest, match="rank"):
        engine.load_adapter(_adapter(engine, "wide", r=CONFIG.adapters.max_lora_rank * 2))
    bad = _adapter(engine, "bad")
    bad.a["q_proj"] = np.zeros((1, 2, 4), np.float32)
    with pytest.raises(InvalidRequest, match="q_proj"):
        engine.load_adapter(bad)
    engine.load_adapter(_adapter(engine, "b"))
    with pytest.raises(CapacityExhausted, match="slots are in use"):
        engine.load_adapter(_adapter(engine, "c"))
    assert sorted(engine.adapters()) == ["a", "b"]

    with pytest.raises(NotFound, match="no adapter named 'nope'") as caught:
        engine.unload_adapter("nope")
    assert str(caught.value) == "no adapter named 'nope'"  # not KeyError's repr
    rid = engine.add_request([5, 6], SamplingParams(max_tokens=2), adapter="a")
    with pytest.raises(InUse, match="in use by 1 request"):
        engine.unload_adapter("a")
    assert engine.abort(rid)
    engine.unload_adapter("a")
    engine.unload_adapter("b")
    assert engine.adapters() == []
    with pytest.raises(KeyError):  # old callers catch the builtin
        engine.unload_adapter("a")


def test_job_errors(engine):
    for call in (engine.job_progress, engine.cancel_job, engine.trained_adapter,
                 engine.checkpoint_job, engine.remove_job):
        with pytest.raises(NotFound, match="no job named 'nope'"):
            call("nope")

    with pytest.raises(InvalidRequest, match="trains at most"):
        engine.submit_job(_job("long", length=CONFIG.finetune.max_train_len + 1))
    progress = engine.submit_job(_job("j"))
    assert progress.name == "j" and progress.state == "running" and progress.step == 0
    assert engine.job_progress("j").state == "running"
    assert "j" in engine.adapters()
    with pytest.raises(AlreadyExists, match="already exists"):
        engine.submit_job(_job("j"))
    with pytest.raises(InUse, match="adapter of a finetuning job"):
        engine.load_adapter(_adapter(engine, "j"))
    with pytest.raises(InUse, match="adapter of a finetuning job"):
        engine.unload_adapter("j")
    with pytest.raises(InUse, match="cancel it first"):
        engine.remove_job("j")
    assert engine.checkpoint_job("j") is None  # no checkpoint directory
    assert engine.trained_adapter("j").name == "j"

    engine.load_adapter(_adapter(engine, "a"))  # the second slot
    with pytest.raises(CapacityExhausted, match="slots are in use"):
        engine.submit_job(_job("k"))

    engine.cancel_job("j")
    assert engine.job_progress("j").state == "cancelled"
    engine.cancel_job("j")  # a no-op for a finished job
    engine.remove_job("j")
    with pytest.raises(NotFound):
        engine.job_progress("j")
    assert engine.adapters() == ["a"]
    assert not engine.has_unfinished()


def test_profile_errors(engine, tmp_path):
    with pytest.raises(InvalidRequest, match="num_steps"):
        engine.start_profile(str(tmp_path / "trace"), 0)
    engine.start_profile(str(tmp_path / "trace"), 5)
    with pytest.raises(InUse, match="already being captured"):
        engine.start_profile(str(tmp_path / "trace2"), 5)
    engine.close()  # ends the trace: a new one may start
    engine.start_profile(str(tmp_path / "trace3"), 1)


# ----- the server's mapping -------------------------------------------------------------

# Messages that the old text matching would have misread: the type alone decides.
MISLEADING = "all adapter slots are in use; already; in use by; adapter of a finetuning job"


@pytest.mark.parametrize(("error", "code"), [
    (InvalidRequest(MISLEADING), grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound(MISLEADING), grpc.StatusCode.NOT_FOUND),
    (AlreadyExists("x"), grpc.StatusCode.ALREADY_EXISTS),
    (InUse("x"), grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityExhausted("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (AdmissionError("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ValueError(MISLEADING), grpc.StatusCode.INVALID_ARGUMENT),
    (KeyError(MISLEADING), grpc.StatusCode.NOT_FOUND),
    (FileNotFoundError("x"), grpc.StatusCode.NOT_FOUND),
    (FileExistsError("x"), grpc.StatusCode.ALREADY_EXISTS),
    (EngineFailed("x"), grpc.StatusCode.UNAVAILABLE),
    (ServiceError(grpc.StatusCode.PERMISSION_DENIED, "x"), grpc.StatusCode.PERMISSION_DENIED),
    (RuntimeError("x"), grpc.StatusCode.INTERNAL),
])
def test_classify_maps_types_not_messages(error, code):
    got, message = classify(error)
    assert got == code
    if code != grpc.StatusCode.INTERNAL:
        assert message == error.args[-1]  # KeyError's message unquoted


def test_errors_subclass_the_builtins_they_replace():
    for kind in (InvalidRequest, AlreadyExists, InUse, CapacityExhausted, AdmissionError):
        assert issubclass(kind, EngineError) and issubclass(kind, ValueError)
    assert issubclass(NotFound, EngineError) and issubclass(NotFound, KeyError)
    from coserve_jax.slo import AdmissionError as old_import

    assert old_import is AdmissionError


def test_http_statuses_follow_the_types():
    from server.http.errors import from_exception

    statuses = {InvalidRequest: 400, NotFound: 404, AlreadyExists: 409, InUse: 400,
                CapacityExhausted: 429, AdmissionError: 429}
    for kind, status in statuses.items():
        error = from_exception(kind("name: something"))
        assert error.status == status, kind
        assert error.message == "name: something" and error.param == "name"
