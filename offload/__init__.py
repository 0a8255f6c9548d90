"""offload: run as much of a pipeline as the device can afford, offload the rest over gRPC.

The public surface is what this module exports; everything in ``offload._*`` may change.
"""

try:
    from .v1 import offload_pb2 as _offload_pb2  # noqa: F401
except ImportError as exc:  # a source checkout before `make proto`
    raise ImportError(
        "offload's generated gRPC stubs (offload/v1/offload_pb2.py) are missing: run `make proto`"
    ) from exc

from ._client import Client, run_client
from ._codec import decode, encode
from ._config import (
    ClientConfig,
    ClientSecurity,
    Keepalive,
    Limits,
    LinkConfig,
    ServerConfig,
    ServerSecurity,
)
from ._pipeline import ItemContext, Pipeline, current_item, load_pipeline, run_tasks
from ._server import RunningServer, serve
from ._service import RemoteExecutor
from ._transport import GrpcTransport, InProcessTransport, Transport
from .exceptions import (
    CodecError,
    ConfigError,
    OffloadError,
    PipelineError,
    PipelineMismatch,
    ServerError,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "ClientConfig",
    "ClientSecurity",
    "CodecError",
    "ConfigError",
    "GrpcTransport",
    "InProcessTransport",
    "ItemContext",
    "Keepalive",
    "Limits",
    "LinkConfig",
    "OffloadError",
    "Pipeline",
    "PipelineError",
    "PipelineMismatch",
    "RemoteExecutor",
    "RunningServer",
    "ServerConfig",
    "ServerError",
    "ServerSecurity",
    "Transport",
    "current_item",
    "decode",
    "encode",
    "load_pipeline",
    "run_client",
    "run_tasks",
    "serve",
]
