"""The ``server`` extra: import one of its packages, or say in one line what to install.

A device's lean install (``pip install offload``) leaves the extra out; the server, the
embedded server and the health check import its packages only through here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from .exceptions import ConfigError

# The server extra's modules and the distributions that provide them.
EXTRA_PACKAGES = {
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "prometheus_client": "prometheus-client",
    "redis": "redis",
}


def pip_install_server_extra(
    package_dir: Path | None = None,
    distribution: importlib.metadata.Distribution | None = None,
    cwd: Path | None = None,
) -> str:
    """The pip command that adds the ``server`` extra to this installation of offload.

    ``pip install 'offload[server]'`` is right only for an install from an index: from a
    checkout it is ``'.[server]'`` (or the checkout's path), from a wheel file the wheel's.
    The arguments default to the running installation; tests pass their own.
    """
    package_dir = (package_dir or Path(__file__).parent).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    if distribution is None:
        try:
            distribution = importlib.metadata.distribution("offload")
        except importlib.metadata.PackageNotFoundError:
            distribution = None

    def at(path: Path, editable: bool = False) -> str:
        where = "." if path == cwd else str(path)
        return f"pip install {'-e ' if editable else ''}'{where}[server]'"

    origin: dict[str, Any] = {}
    if distribution is not None:
        origin = json.loads(distribution.read_text("direct_url.json") or "{}")
    url = urllib.parse.urlparse(origin.get("url", ""))
    source = Path(urllib.request.url2pathname(url.path)).resolve() if url.scheme == "file" else None
    if (package_dir.parent / "pyproject.toml").is_file():  # run from a checkout
        editable = bool(origin.get("dir_info", {}).get("editable")) and source == package_dir.parent
        return at(package_dir.parent, editable)
    installed = distribution is not None and (
        Path(str(distribution.locate_file("offload/__init__.py"))).resolve()
        == package_dir / "__init__.py"
    )
    if distribution is None or not installed or not origin:
        return "pip install 'offload[server]'"  # from an index, or a copy we cannot trace
    if source is not None and source.exists():
        return at(source)  # `pip install .` from a checkout, or from a wheel file
    # From a URL or a repository: the extra's own requirements.
    extra = [r.split(";")[0].strip() for r in distribution.requires or [] if '"server"' in r]
    return "pip install " + " ".join(f"'{r}'" for r in extra)


def server_extra(module: str, needed_by: str = "the server") -> ModuleType:
    """Import a module of the ``server`` extra, or say in one line what to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if (exc.name or top).partition(".")[0] != top:
            raise  # the package is there but broken: its own error says more
        raise ConfigError(
            f"{needed_by} needs {EXTRA_PACKAGES.get(top, top)}, which a device install leaves "
            f"out: {pip_install_server_extra()}"
        ) from None


def optional(module: str) -> ModuleType | None:
    """A module of the ``server`` extra, or None when the extra is not installed."""
    try:
        return server_extra(module)
    except ConfigError:
        return None
