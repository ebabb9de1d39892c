"""Bearer-token authentication, tenants, and the names tenants' objects get in the engine.

The tokens file has one ``TOKEN TENANT`` pair per line (blank lines and ``#`` comments
are skipped). Only SHA-256 digests of the tokens are kept, and a presented token is
compared against every digest with ``hmac.compare_digest``, so neither the memory of
the server nor the time a check takes tells anything about a valid token.

Adapters and jobs belong to the tenant that created them. The engine has one flat
namespace whose names must match ``[A-Za-z0-9._-]``, so a tenant's object ``name`` is
``<12 hex digits of sha256(tenant)>--<name>`` there: the prefix has a fixed length and
the user's part cannot contain a prefix of its own, so two tenants never meet.
"""

from __future__ import annotations

import hashlib
import hmac
import re

import grpc

DEFAULT_TENANT = "default"
"""The only tenant when the server runs without a tokens file."""

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_LEN = 12
_SEP = "--"
# Methods that need no token: load balancers and orchestrators probe health anonymously.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/",)


class TokenStore:
    """Token digests and their tenants, read from a tokens file."""

    def __init__(self, entries: list[tuple[bytes, str]]):
        self._entries = entries

    @classmethod
    def from_file(cls, path: str) -> TokenStore:
        entries: list[tuple[bytes, str]] = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise ValueError(f"{path}, line {number}: expected 'TOKEN TENANT'")
                token, tenant = parts
                digest = hashlib.sha256(token.encode("utf-8")).digest()
                if any(hmac.compare_digest(digest, d) for d, _ in entries):
                    raise ValueError(f"{path}, line {number}: duplicate token")
                entries.append((digest, tenant))
        if not entries:
            raise ValueError(f"{path} holds no tokens")
        return cls(entries)

    def tenant_of(self, token: str | None) -> str | None:
        """The tenant of a token, or None; every stored digest is compared (constant time)."""
        if not token:
            return None
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        found = None
        for stored, tenant in self._entries:
            if hmac.compare_digest(digest, stored) and found is None:
                found = tenant
        return found


def bearer_token(metadata) -> str | None:
    """The token of an ``authorization: Bearer TOKEN`` metadata entry, if there is one."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Auth:
    """Who is calling: the tenant of a call's token (or the default tenant without auth)."""

    def __init__(self, store: TokenStore | None):
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def tenant_for(self, metadata) -> str | None:
        if self.store is None:
            return DEFAULT_TENANT
        return self.store.tenant_of(bearer_token(metadata))


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a valid bearer token with UNAUTHENTICATED (health is public)."""

    def __init__(self, auth: Auth):
        self.auth = auth

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(PUBLIC_PREFIXES):
            return handler
        if self.auth.tenant_for(handler_call_details.invocation_metadata) is not None:
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails with UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                            "missing or invalid bearer token (metadata 'authorization: "
                            "Bearer TOKEN')")

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, **kwargs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, **kwargs)
    return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)


def tenant_key(tenant: str) -> str:
    return hashlib.sha256(tenant.encode("utf-8")).hexdigest()[:_KEY_LEN]


def check_name(name: str, field: str) -> str:
    """A valid user-visible adapter or job name, or ``ValueError`` naming the field."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{field} {name!r} must be 1-64 characters of letters, digits and "
                         "'._-', starting with a letter or digit")
    return name


def internal_name(tenant: str, name: str, field: str = "name") -> str:
    """The engine's name for a tenant's adapter or job."""
    return f"{tenant_key(tenant)}{_SEP}{check_name(name, field)}"


def public_name(tenant: str, internal: str) -> str | None:
    """The tenant's name for an engine name, or None if the engine name is not theirs."""
    prefix = tenant_key(tenant) + _SEP
    return internal[len(prefix):] if internal.startswith(prefix) else None
