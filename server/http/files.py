"""Uploaded files (``/v1/files``): JSONL training data, validated at upload, kept per tenant.

A file is stored as ``<root>/<tenant key>/<file id>.jsonl`` beside ``<file id>.json``
(its OpenAI file object and its tenant). The root is ``files/`` under the server's state
directory, so files survive a restart as jobs do. An upload is checked line by line
with the same code that builds training data (OpenAI's chat format ``{"messages": [...]}``,
and our ``{"text": ...}`` and ``{"prompt": ..., "completion": ...}``), tokenized with the
model's tokenizer, so a job never fails on data that was accepted; the error names the
first bad line.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import tempfile
import time

from coserve_jax.finetune.data import DataConfig, load_jsonl

from ..auth import tenant_key
from ..paths import write_atomic
from .errors import HttpError

PURPOSES = ("fine-tune",)


class FileStore:
    """Tenants' uploaded files on disk."""

    def __init__(self, root: str | None, tokenizer, max_train_len: int):
        self.root = root or tempfile.mkdtemp(prefix="coserve-files-")
        self.tokenizer = tokenizer
        self.max_train_len = max_train_len

    def _dir(self, tenant: str) -> str:
        return os.path.join(self.root, tenant_key(tenant))

    def _paths(self, tenant: str, file_id: str) -> tuple[str, str]:
        if not file_id.startswith("file-") or not file_id[5:].isalnum():
            raise self._missing(file_id)
        base = os.path.join(self._dir(tenant), file_id)
        return base + ".jsonl", base + ".json"

    @staticmethod
    def _missing(file_id: str) -> HttpError:
        return HttpError(404, f"file_id: no file {file_id!r}", "file_id", "file_not_found")

    async def create(self, tenant: str, filename: str, purpose: str, data: bytes) -> dict:
        """Validates and stores an upload; 400 naming the first bad line."""
        if purpose not in PURPOSES:
            raise HttpError(400, f"purpose: must be one of {list(PURPOSES)}, got {purpose!r}",
                            "purpose")
        if not data.strip():
            raise HttpError(400, "file: the file is empty", "file", "invalid_file")
        file_id = f"file-{secrets.token_hex(12)}"
        directory = self._dir(tenant)
        os.makedirs(directory, exist_ok=True)
        data_path, meta_path = self._paths(tenant, file_id)
        write_atomic(data_path, data)
        try:
            lines = await asyncio.to_thread(self._validate, data_path, filename)
        except BaseException:
            os.unlink(data_path)
            raise
        meta = {"id": file_id, "object": "file", "bytes": len(data),
                "created_at": int(time.time()), "filename": filename, "purpose": purpose,
                "status": "processed", "status_details": None, "expires_at": None,
                "lines": lines}
        write_atomic(meta_path, json.dumps({"tenant": tenant, "file": meta,
                                                    "created": time.time()}).encode())
        return meta

    def _validate(self, path: str, filename: str) -> int:
        # As a job would read it (the engine's longest sequence); a server that does not
        # finetune still checks the lines, its jobs are refused when created.
        longest = self.max_train_len if self.max_train_len >= 2 else 1 << 30
        config = DataConfig(max_seq_len=longest, overlong="truncate")
        try:
            dataset = load_jsonl(path, self.tokenizer, config)
        except ValueError as e:  # "<path>, line N: ..." -> "file (name), line N: ..."
            message = str(e).replace(path, f"file {filename!r}")
            if not message.startswith("file"):
                message = f"file {filename!r}: {message}"
            raise HttpError(400, message, "file", "invalid_file") from None
        return len(dataset) + dataset.num_skipped

    def get(self, tenant: str, file_id: str) -> dict:
        return self._stored(tenant, file_id)["file"]

    def _stored(self, tenant: str, file_id: str) -> dict:
        _, meta_path = self._paths(tenant, file_id)
        try:
            with open(meta_path) as f:
                stored = json.load(f)
        except FileNotFoundError:
            raise self._missing(file_id) from None
        if stored["tenant"] != tenant:  # a different tenant whose key collided: not theirs
            raise self._missing(file_id)
        return stored

    def content(self, tenant: str, file_id: str) -> bytes:
        self.get(tenant, file_id)
        with open(self._paths(tenant, file_id)[0], "rb") as f:
            return f.read()

    def records(self, tenant: str, file_id: str) -> list[dict]:
        """The file's samples (it was validated at upload)."""
        return [json.loads(line) for line in self.content(tenant, file_id).decode().splitlines()
                if line.strip()]

    def list(self, tenant: str, purpose: str | None = None) -> list[dict]:
        directory = self._dir(tenant)
        if not os.path.isdir(directory):
            return []
        stored = []
        for name in os.listdir(directory):
            if name.endswith(".json"):
                try:
                    stored.append(self._stored(tenant, name[:-5]))
                except HttpError:
                    continue
        stored.sort(key=lambda s: (s["created"], s["file"]["id"]), reverse=True)
        return [s["file"] for s in stored if purpose is None or s["file"]["purpose"] == purpose]

    def delete(self, tenant: str, file_id: str) -> dict:
        self.get(tenant, file_id)
        for path in self._paths(tenant, file_id):
            os.unlink(path)
        return {"id": file_id, "object": "file", "deleted": True}
