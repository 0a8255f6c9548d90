"""The public surface is what ``offload`` exports: changing it is a deliberate act."""

from __future__ import annotations

import offload
import offload.testing

PUBLIC = [
    "Client", "ClientConfig", "ClientSecurity", "CodecError", "ConfigError", "Decision",
    "GrpcTransport", "ItemContext", "Keepalive", "Limits", "LinkConfig", "Measurements",
    "ModelPolicy", "OffloadError", "Pipeline", "PipelineError", "PipelineMismatch", "Prediction",
    "RunningServer", "ServerConfig", "ServerError", "ServerSecurity", "SplitPolicy", "State",
    "Stream", "Transport", "current_item", "current_state", "decode", "encode", "load_pipeline",
    "publish_view", "run_client", "serve", "stateful",
]  # fmt: skip
TESTING = ["InProcessTransport", "MemoryState", "RemoteExecutor", "run_with_state"]


def test_the_public_names_are_pinned() -> None:
    assert sorted(offload.__all__) == PUBLIC
    assert sorted(offload.testing.__all__) == TESTING


def test_the_public_list_is_what_the_module_defines() -> None:
    """Derived from vars(): a public name added without __all__ (or the reverse) fails here."""
    defined = {
        name
        for name, value in vars(offload).items()
        if not name.startswith("_") and not isinstance(value, type(offload))
    }
    assert defined == set(offload.__all__)


def test_public_names_show_their_public_module() -> None:
    for name in PUBLIC:
        module = getattr(getattr(offload, name), "__module__", "offload")
        assert not module.startswith("offload._"), f"{name} shows its private module {module}"


def test_every_public_name_resolves_and_errors_share_one_base() -> None:
    for name in PUBLIC:
        assert getattr(offload, name) is not None, name
    errors = [getattr(offload, n) for n in PUBLIC if n.endswith(("Error", "Mismatch"))]
    assert all(issubclass(e, offload.OffloadError) for e in errors)
