"""Log set-up: level names and the JSON format."""

from __future__ import annotations

import json
import logging

import pytest

from coserve_jax.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines(capsys):
    setup_logging("debug", json_format=True)
    logging.getLogger("coserve_jax.test").info("hello %s", "there")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    rec = json.loads(line)
    assert rec["level"] == "INFO" and rec["message"] == "hello there"
    assert rec["logger"] == "coserve_jax.test" and rec["time"].endswith("Z")
    setup_logging("warning")
    logging.getLogger("x").info("hidden")
    assert "hidden" not in capsys.readouterr().err


def test_unknown_level():
    with pytest.raises(ValueError, match="log level"):
        setup_logging("loud")
