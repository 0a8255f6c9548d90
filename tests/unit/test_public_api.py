"""The public surface is what ``offload`` exports: changing it is a deliberate act."""

from __future__ import annotations

import offload

PUBLIC = [
    "Client", "ClientConfig", "ClientSecurity", "CodecError", "ConfigError", "GrpcTransport",
    "InProcessTransport", "ItemContext", "Keepalive", "Limits", "LinkConfig", "OffloadError",
    "Pipeline", "PipelineError", "PipelineMismatch", "RemoteExecutor", "RunningServer",
    "ServerConfig", "ServerError", "ServerSecurity", "Transport", "current_item", "decode",
    "encode", "load_pipeline", "run_client", "run_tasks", "serve",
]  # fmt: skip


def test_the_public_names_are_pinned() -> None:
    assert sorted(offload.__all__) == PUBLIC


def test_every_public_name_resolves_and_errors_share_one_base() -> None:
    for name in PUBLIC:
        assert getattr(offload, name) is not None, name
    errors = [getattr(offload, n) for n in PUBLIC if n.endswith(("Error", "Mismatch"))]
    assert all(issubclass(e, offload.OffloadError) for e in errors)
