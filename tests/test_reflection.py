r"""gRPC reflection as ``grpc.reflection.v1`` and ``v1alpha`` against an in-process server.

Both versions list the same services and describe every one of them. ``v1`` is checked the way a
client that knows only what reflection told it (grpcurl, grpcui) uses it: its messages are built
from the descriptor that reflection returns for ``grpc.reflection.v1.ServerReflection``.
"""
import grpc
import pytest
from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection_pb2

from loss_service.server import SERVICE_NAME, BackgroundServer, ServerConfig
from loss_service.server.reflection import V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME

VERSIONS = (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
SERVICES = {SERVICE_NAME, health.SERVICE_NAME, *VERSIONS}
CALL_TIMEOUT = 20


@pytest.fixture(scope="module")
def channel(server_artifacts):
    config = ServerConfig(port=0, artifacts=str(server_artifacts.folder), export_missing=server_artifacts.export_missing,
                          workers=1, reflection=True)
    with BackgroundServer(config, address="127.0.0.1:0") as running, grpc.insecure_channel(running.target) as opened:
        yield opened


def reflect(channel, service, request, metadata=None, response_type=reflection_pb2.ServerReflectionResponse):
    r"""The one response of ``service``'s ServerReflectionInfo to ``request``, read as a ``response_type``."""
    call = channel.stream_stream(f"/{service}/ServerReflectionInfo", request_serializer=type(request).SerializeToString,
                                 response_deserializer=response_type.FromString)
    (response,) = call(iter([request]), timeout=CALL_TIMEOUT, metadata=metadata)
    return response


def list_services(channel, service, metadata=None):
    response = reflect(channel, service, reflection_pb2.ServerReflectionRequest(list_services=""), metadata)
    return {listed.name for listed in response.list_services_response.service}


def describe(channel, service, symbol):
    r"""A descriptor pool of the files ``service`` sends for ``symbol`` (the file that defines it and its imports)."""
    response = reflect(channel, service, reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol))
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    database = descriptor_database.DescriptorDatabase()
    for serialized in response.file_descriptor_response.file_descriptor_proto:
        database.Add(descriptor_pb2.FileDescriptorProto.FromString(serialized))
    return descriptor_pool.DescriptorPool(descriptor_db=database)


def wire_layout(message):
    r"""What a message's bytes depend on: each field's number, name, type, repetition, oneof, message type."""
    return [(field.number, field.name, field.type, field.is_repeated,
             field.containing_oneof.name if field.containing_oneof else None,
             field.message_type.name if field.message_type else None) for field in message.fields]


@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_lists_every_service(channel, version):
    assert list_services(channel, version) == SERVICES


@pytest.mark.parametrize("symbol", sorted(SERVICES))
@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_describes_every_listed_service(channel, version, symbol):
    assert describe(channel, version, symbol).FindServiceByName(symbol).full_name == symbol


def test_v1_is_v1alpha_with_the_package_renamed(channel):
    v1 = describe(channel, V1_SERVICE_NAME, V1_SERVICE_NAME).FindServiceByName(V1_SERVICE_NAME).file
    v1alpha = reflection_pb2.DESCRIPTOR
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert list(v1.message_types_by_name) == list(v1alpha.message_types_by_name)
    for name, message in v1alpha.message_types_by_name.items():
        assert wire_layout(v1.message_types_by_name[name]) == wire_layout(message), name
    proto = descriptor_pb2.FileDescriptorProto()
    v1.CopyToProto(proto)
    assert b"v1alpha" not in proto.SerializeToString()
    assert not v1.GetOptions().deprecated and v1alpha.GetOptions().deprecated


def test_a_client_that_knows_only_the_reflected_v1_descriptor_can_use_v1(channel):
    pool = describe(channel, V1_SERVICE_NAME, V1_SERVICE_NAME)
    method = pool.FindServiceByName(V1_SERVICE_NAME).methods_by_name["ServerReflectionInfo"]
    request_type, response_type = map(message_factory.GetMessageClass, (method.input_type, method.output_type))
    assert request_type.DESCRIPTOR.full_name == "grpc.reflection.v1.ServerReflectionRequest"
    listed = reflect(channel, V1_SERVICE_NAME, request_type(list_services=""), response_type=response_type)
    assert {service.name for service in listed.list_services_response.service} == SERVICES
    unknown = reflect(channel, V1_SERVICE_NAME, request_type(file_containing_symbol="no.such.Service"),
                      response_type=response_type)
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert unknown.original_request.file_containing_symbol == "no.such.Service"
