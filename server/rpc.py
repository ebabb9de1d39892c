"""Registers the ``coserve.v1.Coserve`` servicer so that a request whose bytes do not
parse is answered INVALID_ARGUMENT.

The generated ``add_CoserveServicer_to_server`` hands each method's ``FromString`` to
grpc as its deserializer; grpc answers a deserializer's exception (a protobuf
``DecodeError``) with UNKNOWN and logs a traceback, as if the server had a bug. Here the
deserializer never raises: it returns a :class:`Malformed` in place of the request, and
the method's handler aborts with INVALID_ARGUMENT before the servicer sees it. The
handlers are built from the service descriptor, so every method of the proto is
covered, unary or streaming.
"""

from __future__ import annotations

import dataclasses

import grpc
from google.protobuf import message_factory

from .proto import coserve_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Coserve"]


@dataclasses.dataclass(frozen=True)
class Malformed:
    """Stands in for a request whose bytes did not parse."""

    message: str


def _deserializer(message_class):
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except Exception as e:  # DecodeError, or anything else the parser raises
            return Malformed(f"the request is not a valid {name} message: {e}")

    return parse


def _unary(behavior):
    async def handle(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return handle


def _streaming(behavior):
    async def handle(request, context):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        responses = behavior(request, context)
        try:
            async for response in responses:
                yield response
        finally:  # a cancelled call ends the servicer's generator now, not at GC
            await responses.aclose()

    return handle


def method_handlers(servicer) -> dict[str, grpc.RpcMethodHandler]:
    """Method name -> handler for every method of the service (unary or server-streaming
    responses; the service has no streaming requests)."""
    handlers = {}
    for method in SERVICE.methods:
        if method.client_streaming:
            raise NotImplementedError(f"{method.full_name} streams requests")
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        wrap = _streaming if method.server_streaming else _unary
        handlers[method.name] = make(wrap(behavior),
                                     request_deserializer=_deserializer(request),
                                     response_serializer=response.SerializeToString)
    return handlers


def add_servicer(servicer, server: grpc.aio.Server) -> None:
    """What ``coserve_pb2_grpc.add_CoserveServicer_to_server`` does, with parse failures
    answered INVALID_ARGUMENT."""
    handlers = method_handlers(servicer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
