"""The KServe v2 gRPC messages (``inference.GRPCInferenceService``), built at import into a private pool.

**Why built here, and why in a private descriptor pool.** Generated ``*_pb2.py`` stubs register their
``.proto`` in protobuf's one process-wide default pool. ``tritonclient.grpc`` ships its own generated
stubs for the same package ``inference``, so a second set of generated stubs (ours) in that pool makes the
second import fail with ``Couldn't build proto file into descriptor pool: duplicate symbol
'inference.ServerLiveRequest'`` — the reason ``import mlserver; import tritonclient.grpc`` fails
(SeldonIO/MLServer#1730, triton-inference-server/client#730, kserve/kserve#3099). The ways out:

- reuse tritonclient's stubs: the device would depend on a *client* package and on its protobuf pin, for
  forty-odd messages it does not serve;
- our own generated stubs under another proto package: the message names are not on the wire, so this is
  wire-compatible, but it needs protoc at build time and checked-in generated code;
- **this module**: the descriptors of the messages the server answers with, declared below (same
  package ``inference``, same names, same field numbers and types as Triton's ``grpc_service.proto``,
  which is a superset of KServe's ``grpc_predict_v2.proto``), added to a :class:`DescriptorPool` of our
  own. Nothing touches the default pool, so tritonclient's stubs import next to these in one process
  (the tests do exactly that), no protoc, no generated code. ``tests/agent_api/test_grpc.py`` checks the
  declarations field by field against tritonclient's descriptors.

grpcio needs no descriptors to serve: the service is registered by name (``grpc_server.py``) with each
message's ``FromString``/``SerializeToString``.

Usage::

    from edgepack.agent.api.grpc_proto import messages
    request = messages.ModelInferRequest.FromString(data)
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

__all__ = ["METHODS", "PACKAGE", "SERVICE", "messages"]

PACKAGE = "inference"
SERVICE = f"{PACKAGE}.GRPCInferenceService"

_F = descriptor_pb2.FieldDescriptorProto
_BOOL, _STRING, _INT64, _BYTES, _MESSAGE = _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_INT64, _F.TYPE_BYTES, _F.TYPE_MESSAGE
_PARAMS = "map<InferParameter>"  # map<string, InferParameter>, spelled out as protobuf does (a nested *Entry)

# message -> fields (number, name, type, repeated, message type); nested messages as {"Name": fields}
_Fields = list[tuple[int, str, int, bool, str | None]]
_TENSOR_METADATA: _Fields = [
    (1, "name", _STRING, False, None),
    (2, "datatype", _STRING, False, None),
    (3, "shape", _INT64, True, None),
]
# fmt: off
_MESSAGES: dict[str, tuple[_Fields, dict[str, _Fields]]] = {
    "ServerLiveRequest": ([], {}),
    "ServerLiveResponse": ([(1, "live", _BOOL, False, None)], {}),
    "ServerReadyRequest": ([], {}),
    "ServerReadyResponse": ([(1, "ready", _BOOL, False, None)], {}),
    "ModelReadyRequest": ([(1, "name", _STRING, False, None), (2, "version", _STRING, False, None)], {}),
    "ModelReadyResponse": ([(1, "ready", _BOOL, False, None)], {}),
    "ServerMetadataRequest": ([], {}),
    "ServerMetadataResponse": (
        [(1, "name", _STRING, False, None), (2, "version", _STRING, False, None),
         (3, "extensions", _STRING, True, None)], {}),
    "ModelMetadataRequest": ([(1, "name", _STRING, False, None), (2, "version", _STRING, False, None)], {}),
    "ModelMetadataResponse": (
        [(1, "name", _STRING, False, None), (2, "versions", _STRING, True, None), (3, "platform", _STRING, False, None),
         (4, "inputs", _MESSAGE, True, "TensorMetadata"), (5, "outputs", _MESSAGE, True, "TensorMetadata")],
        {"TensorMetadata": _TENSOR_METADATA},
    ),
    "InferTensorContents": (
        [(1, "bool_contents", _BOOL, True, None), (2, "int_contents", _F.TYPE_INT32, True, None),
         (3, "int64_contents", _INT64, True, None), (4, "uint_contents", _F.TYPE_UINT32, True, None),
         (5, "uint64_contents", _F.TYPE_UINT64, True, None), (6, "fp32_contents", _F.TYPE_FLOAT, True, None),
         (7, "fp64_contents", _F.TYPE_DOUBLE, True, None), (8, "bytes_contents", _BYTES, True, None)], {}),
    "ModelInferRequest": (
        [(1, "model_name", _STRING, False, None), (2, "model_version", _STRING, False, None),
         (3, "id", _STRING, False, None), (4, "parameters", _MESSAGE, True, _PARAMS),
         (5, "inputs", _MESSAGE, True, "InferInputTensor"), (6, "outputs", _MESSAGE, True, "InferRequestedOutputTensor"),
         (7, "raw_input_contents", _BYTES, True, None)],
        {
            "InferInputTensor": [*_TENSOR_METADATA, (4, "parameters", _MESSAGE, True, _PARAMS),
                                 (5, "contents", _MESSAGE, False, ".inference.InferTensorContents")],
            "InferRequestedOutputTensor": [(1, "name", _STRING, False, None),
                                           (2, "parameters", _MESSAGE, True, _PARAMS)],
        },
    ),
    "ModelInferResponse": (
        [(1, "model_name", _STRING, False, None), (2, "model_version", _STRING, False, None),
         (3, "id", _STRING, False, None), (4, "parameters", _MESSAGE, True, _PARAMS),
         (5, "outputs", _MESSAGE, True, "InferOutputTensor"), (6, "raw_output_contents", _BYTES, True, None)],
        {"InferOutputTensor": [*_TENSOR_METADATA, (4, "parameters", _MESSAGE, True, _PARAMS),
                               (5, "contents", _MESSAGE, False, ".inference.InferTensorContents")]},
    ),
}
# fmt: on

# RPC name -> (request message, response message), the ones this server answers
METHODS: dict[str, tuple[str, str]] = {
    name: (f"{name}Request", f"{name}Response")
    for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
}

# Triton's optional RPCs: answered UNIMPLEMENTED (a client then knows the server lacks them, at once)
OPTIONAL_METHODS = (
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)


def _infer_parameter() -> descriptor_pb2.DescriptorProto:
    """``InferParameter``: a oneof of bool, int64, string, double, uint64."""
    message = descriptor_pb2.DescriptorProto(name="InferParameter")
    message.oneof_decl.add(name="parameter_choice")
    types = [
        ("bool_param", _BOOL),
        ("int64_param", _INT64),
        ("string_param", _STRING),
        ("double_param", _F.TYPE_DOUBLE),
        ("uint64_param", _F.TYPE_UINT64),
    ]
    for number, (name, kind) in enumerate(types, start=1):
        message.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL, oneof_index=0)
    return message


def _add_fields(message: descriptor_pb2.DescriptorProto, scope: str, fields: _Fields) -> None:
    for number, name, kind, repeated, type_name in fields:
        field = message.field.add(name=name, number=number, type=kind)
        field.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if type_name == _PARAMS:
            entry = message.nested_type.add(name=f"{_camel(name)}Entry")
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=_STRING, label=_F.LABEL_OPTIONAL)
            entry.field.add(
                name="value", number=2, type=_MESSAGE, label=_F.LABEL_OPTIONAL, type_name=".inference.InferParameter"
            )
            field.type_name = f"{scope}.{entry.name}"
        elif type_name is not None:
            field.type_name = type_name if type_name.startswith(".") else f"{scope}.{type_name}"


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(name="edgepack/kserve_v2.proto", package=PACKAGE, syntax="proto3")
    proto.message_type.append(_infer_parameter())
    for name, (fields, nested) in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        scope = f".{PACKAGE}.{name}"
        for nested_name, nested_fields in nested.items():
            inner = message.nested_type.add(name=nested_name)
            _add_fields(inner, f"{scope}.{nested_name}", nested_fields)
        _add_fields(message, scope, fields)
    return proto


def _build() -> SimpleNamespace:
    pool = descriptor_pool.DescriptorPool()  # ours alone: see the module docstring
    pool.Add(_file())
    classes: dict[str, Any] = {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in ("InferParameter", *_MESSAGES)
    }
    return SimpleNamespace(pool=pool, **classes)


messages = _build()
