r"""gRPC server reflection under both of its names: ``grpc.reflection.v1`` and ``grpc.reflection.v1alpha``.

grpcio-reflection ships only ``v1alpha``; newer clients (grpcurl since 1.8.8, for one) ask for
``v1`` first. The two protocols differ only in their proto package: the messages have the same
fields and numbers, so the same bytes on the wire. ``v1`` is therefore served by the ``v1alpha``
servicer with the ``v1alpha`` messages, under the ``v1`` service name. So that reflection can
describe ``v1`` too, importing this module adds ``grpc/reflection/v1/reflection.proto`` to the
default descriptor pool (the pool reflection answers from), built from the ``v1alpha`` file
descriptor with the package renamed.
"""
from __future__ import annotations

from typing import Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

# The name under which gRPC's own v1 reflection.proto is registered (grpc-go, grpc-proto).
V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"


def _v1(name: str) -> str:
    r"""``name`` (a package, type, Java or Go package name) with ``v1alpha`` replaced by ``v1``."""
    return name.replace("v1alpha", "v1")


def _v1_file_descriptor() -> descriptor.FileDescriptor:
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = V1_FILE_NAME
    proto.package = _v1(proto.package)
    for message in proto.message_type:
        for field in message.field:
            if field.HasField("type_name"):  # only message fields name a type; the pool refuses one elsewhere
                field.type_name = _v1(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = _v1(method.input_type)
            method.output_type = _v1(method.output_type)
    proto.options.java_package = _v1(proto.options.java_package)
    proto.options.go_package = _v1(proto.options.go_package)
    # v1alpha is marked deprecated in favour of v1; v1 is not.
    proto.options.ClearField("deprecated")
    return descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())


V1_FILE = _v1_file_descriptor()
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_SERVICE_NAME = V1_FILE.services_by_name["ServerReflection"].full_name


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    r"""Serve reflection on ``server`` as ``v1`` and ``v1alpha``, listing ``service_names`` and both of them."""
    servicer = reflection.aio.ReflectionServicer((*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        ),
    }
    for name in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME):  # both registrations, as generated add_*_to_server does
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
        server.add_registered_method_handlers(name, handlers)
