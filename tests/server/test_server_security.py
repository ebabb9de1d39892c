"""Bearer tokens, tenant isolation, TLS and mutual TLS, and path confinement."""

from __future__ import annotations

import hashlib
import hmac
import os

import grpc
import pytest

from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import save_adapter
from server.auth import TokenStore, internal_name, public_name
from server.client import Client, finetune_request
from server.mock_engine import mock_model_config
from server.paths import PathError, resolve_under
from server.proto import coserve_pb2 as pb

from server_support import make_certificates, mock_server

RECORDS = [{"text": f"sample {i}"} for i in range(8)]


def status(fn) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


@pytest.fixture
def tokens_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_text("# token tenant\n\ntok-alice alice\ntok-bob bob\ntok-alice-2 alice\n")
    return str(path)


def test_token_store_keeps_digests_and_compares_them_all(tokens_file, monkeypatch):
    store = TokenStore.from_file(tokens_file)
    assert all(isinstance(d, bytes) and len(d) == 32 for d, _ in store._entries)
    assert b"tok-alice" not in repr(store._entries).encode()
    assert store._entries[0][0] == hashlib.sha256(b"tok-alice").digest()
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.tenant_of("tok-alice") == "alice" and len(calls) == 3  # no early exit
    assert store.tenant_of("tok-bob") == "bob"
    assert store.tenant_of("tok-alice-2") == "alice"
    assert store.tenant_of("nope") is None and store.tenant_of("") is None


def test_bad_tokens_files(tmp_path):
    for text, words in [("", "no tokens"), ("a b c\n", "line 1"), ("a x\na y\n", "duplicate")]:
        (tmp_path / "t").write_text(text)
        with pytest.raises(ValueError, match=words):
            TokenStore.from_file(str(tmp_path / "t"))


def test_engine_names_keep_tenants_apart():
    a, b = internal_name("alice", "x"), internal_name("bob", "x")
    assert a != b and public_name("alice", a) == "x" and public_name("bob", a) is None
    # A user part can never reach into another tenant's prefix.
    assert public_name("bob", internal_name("alice", b[:12] + "--x")) is None
    with pytest.raises(ValueError, match="name"):
        internal_name("alice", "../x")


def test_no_token_is_unauthenticated(tmp_path, tokens_file):
    with mock_server(tmp_path, tokens_file=tokens_file) as server:
        for token in (None, "wrong", "tok-alice "[:-1] + "x"):
            with Client(server.address, token=token) as c:
                for fn in (lambda c=c: c.generate([5], max_tokens=2),
                           lambda c=c: c.list_jobs(), lambda c=c: list(c.watch_job("x")),
                           lambda c=c: c.list_adapters(),
                           lambda c=c: c.submit_finetune(finetune_request(
                               "j", records=RECORDS, max_steps=1))):
                    assert status(fn) == grpc.StatusCode.UNAUTHENTICATED
                assert c.health() == "SERVING"  # probes need no token
        with Client(server.address) as c:  # a malformed header
            c.metadata = (("authorization", "Basic tok-alice"),)
            assert status(lambda: c.list_jobs()) == grpc.StatusCode.UNAUTHENTICATED
        with Client(server.address, token="tok-alice") as c:
            assert c.generate([5], max_tokens=2).result.completion_tokens == 2


def test_tenants_are_invisible_to_each_other(tmp_path, tokens_file):
    root = tmp_path / "adapters"
    save_adapter(LoraAdapter.zeros_b("a", LoraConfig(r=4), mock_model_config(), 0),
                 str(root / "shared"))
    with mock_server(tmp_path, tokens_file=tokens_file, engine=dict(step_delay=0.01)) as server, \
            Client(server.address, token="tok-alice") as alice, \
            Client(server.address, token="tok-bob") as bob, \
            Client(server.address, token="tok-alice-2") as alice2:
        alice.load_adapter("shared", name="style")
        alice.submit_finetune(finetune_request("job", records=RECORDS, max_steps=10**6))
        # Bob sees nothing of Alice's ...
        assert bob.list_adapters() == [] and bob.list_jobs() == []
        # ... cannot use, inspect, cancel, unload or export it ...
        not_found = grpc.StatusCode.NOT_FOUND
        for fn in (lambda: bob.generate([5], adapter="style", max_tokens=2),
                   lambda: bob.generate([5], adapter="job", max_tokens=2),
                   lambda: bob.get_job("job"), lambda: bob.cancel_job("job"),
                   lambda: list(bob.watch_job("job")), lambda: bob.unload_adapter("style"),
                   lambda: bob.export_adapter("style", "stolen"),
                   lambda: bob.export_adapter("job", "stolen")):
            assert status(fn) == not_found
        assert not os.path.exists(root / "stolen")
        # ... and has names of his own, the same ones included.
        assert bob.load_adapter("shared", name="style").name == "style"
        bob.submit_finetune(finetune_request("job", records=RECORDS, max_steps=3))
        assert [a.name for a in bob.list_adapters()] == ["job", "style"]
        bob.unload_adapter("style")
        # Alice's objects are untouched, and another token of hers sees them.
        assert alice.get_job("job").state == pb.JOB_STATE_RUNNING
        assert [a.name for a in alice2.list_adapters()] == ["job", "style"]
        assert alice.generate([5], adapter="style", max_tokens=2).result.completion_tokens == 2
        assert alice2.cancel_job("job").state == pb.JOB_STATE_CANCELLED


def test_tls_and_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path)
    with mock_server(tmp_path, tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                     host="localhost") as server:
        with Client(server.address, tls_ca=certs["ca.pem"]) as c:
            assert c.generate([5], max_tokens=2).result.completion_tokens == 2
        with Client(server.address) as plain:  # plaintext to a TLS port fails
            assert status(lambda: plain.generate([5], max_tokens=2, timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE
    with mock_server(tmp_path, tls_cert=certs["server.pem"], tls_key=certs["server.key"],
                     tls_client_ca=certs["ca.pem"], host="localhost") as server:
        with Client(server.address, tls_ca=certs["ca.pem"], tls_cert=certs["client.pem"],
                    tls_key=certs["client.key"]) as c:
            assert c.generate([5], max_tokens=2).result.completion_tokens == 2
        with Client(server.address, tls_ca=certs["ca.pem"]) as no_cert:
            assert status(lambda: no_cert.generate([5], max_tokens=2, timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE


def test_paths_stay_inside_the_root(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "escape")
    os.symlink(root / "sub", root / "inner")
    assert resolve_under(str(root), "sub/x.jsonl", "f") == str(root / "sub" / "x.jsonl")
    assert resolve_under(str(root), "inner", "f") == str(root / "sub")
    assert resolve_under(str(root), "new/dir", "f") == str(root / "new" / "dir")
    for bad in ("", "/etc/passwd", "../x", "sub/../../x", "sub/..", ".", "./", "escape",
                "escape/x", "a\x00b", "\\x"):
        with pytest.raises(PathError, match="f"):
            resolve_under(str(root), bad, "f")
    with pytest.raises(PathError, match="no adapter root"):
        resolve_under(None, "x", "f", "adapter root")
