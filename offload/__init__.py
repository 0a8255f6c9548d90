"""offload: run as much of a pipeline as the device can afford, offload the rest over gRPC.

The public surface is what this module exports (pinned by ``tests/unit/test_public_api.py``);
everything in ``offload._*`` may change. ``offload.testing`` is the seam for tests without a
network. The face re-exports both sides: the device's ``Client`` and the cloud's ``serve``.
"""

try:
    from .v1 import offload_pb2 as _offload_pb2  # noqa: F401
except ImportError as exc:  # a source checkout before `make proto`
    raise ImportError(
        "offload's generated gRPC stubs (offload/v1/offload_pb2.py) are missing: run `make proto`"
    ) from exc

from ._cloud.serve import RunningServer, serve
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
from ._device.client import Client, run_client
from ._device.scheduler import Decision, Measurements, ModelPolicy, Prediction, SplitPolicy
from ._device.transport import GrpcTransport, Stream, Transport
from ._pipeline import ItemContext, Pipeline, current_item, load_pipeline, stateful
from ._state import State, current_state
from ._views import publish_view
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
    "Decision",
    "GrpcTransport",
    "ItemContext",
    "Keepalive",
    "Limits",
    "LinkConfig",
    "Measurements",
    "ModelPolicy",
    "OffloadError",
    "Pipeline",
    "PipelineError",
    "PipelineMismatch",
    "Prediction",
    "RunningServer",
    "ServerConfig",
    "ServerError",
    "ServerSecurity",
    "SplitPolicy",
    "State",
    "Stream",
    "Transport",
    "current_item",
    "current_state",
    "decode",
    "encode",
    "load_pipeline",
    "publish_view",
    "run_client",
    "serve",
    "stateful",
]

# Reprs and docs show the public path, not the private module a name lives in.
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("offload._"):
        _obj.__module__ = __name__
del _name, _obj
