"""The `coserve` command line: every subcommand explains itself, and the client commands
work against a server."""

from __future__ import annotations

import json
import os

import pytest

from coserve_jax.lora.adapter import LoraAdapter
from coserve_jax.lora.config import LoraConfig
from coserve_jax.lora.peft_io import save_adapter
from server.cli import main
from server.commands import engine_config_from_file
from server.mock_engine import mock_model_config

from server_support import ROOT, mock_server


@pytest.mark.parametrize("command", ["serve", "generate", "finetune", "jobs", "adapters",
                                     "demo"])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and len(text) > 300
    if command == "serve":
        for flag in ("--model", "--config", "--port", "--metrics-port", "--tokens-file",
                     "--tls-cert", "--tls-key", "--tls-client-ca", "--profile-dir",
                     "--data-root", "--adapter-root"):
            assert flag in text


def test_engine_config_file(tmp_path):
    config = engine_config_from_file(os.path.join(ROOT, "configs", "demo.json"))
    assert config.buckets.max_num_seqs == 8 and config.finetune.train_window == 32
    (tmp_path / "bad.json").write_text(json.dumps({"max_num_seqs": 8, "typo": 1}))
    with pytest.raises(ValueError, match="typo"):
        engine_config_from_file(str(tmp_path / "bad.json"))


def test_client_commands(tmp_path, capsys):
    save_adapter(LoraAdapter.zeros_b("a", LoraConfig(r=4), mock_model_config(), 0),
                 str(tmp_path / "adapters" / "style"))
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"text": "hello"}\n')
    with mock_server(tmp_path, engine=dict(step_delay=0.002)) as server:
        s = ["--server", server.address]
        assert main(["generate", "Hello", "--max-tokens", "5", "--seed", "1", *s]) == 0
        out = capsys.readouterr()
        assert out.out.startswith("Hello") and "[length: 5 tokens" in out.err
        assert main(["finetune", "job", "--data", str(data), "--steps", "20", *s]) == 0
        out = capsys.readouterr().out
        assert "submitted job job: 2 samples, 20 steps" in out and "completed" in out
        assert main(["finetune", "syn", "--synthetic", "add:16", "--steps", "1", *s,
                     "--no-watch"]) == 0
        assert main(["jobs", *s]) == 0
        assert "job: completed, step 20/20" in capsys.readouterr().out
        assert main(["jobs", "get", "syn", *s]) == 0
        assert main(["jobs", "cancel", "nope", *s]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err
        assert main(["adapters", "load", "style", *s]) == 0
        assert main(["adapters", "export", "job", "out/job", *s]) == 0
        assert os.path.isfile(tmp_path / "adapters" / "out" / "job" / "adapter_config.json")
        assert main(["adapters", *s]) == 0
        listing = capsys.readouterr().out
        assert "style\tloaded" in listing and "job\tfinetune" in listing
        assert main(["adapters", "unload", "style", *s]) == 0
        with pytest.raises(SystemExit):
            main(["adapters", "load", *s])  # a missing argument is a usage error


def test_checked_in_stubs_match_the_proto(tmp_path):
    """The stubs are generated (python -m server.proto.generate), never edited by hand."""
    from grpc_tools import protoc

    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    assert protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--python_out={tmp_path}",
                        f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                        os.path.join(ROOT, "server", "proto", "coserve.proto")]) == 0
    for name in ("coserve_pb2.py", "coserve_pb2.pyi", "coserve_pb2_grpc.py"):
        with open(os.path.join(ROOT, "server", "proto", name)) as ours, \
                open(tmp_path / "server" / "proto" / name) as fresh:
            assert ours.read() == fresh.read(), f"{name} is stale: run make proto"
