"""Build hook: generate the gRPC stubs from protos/ while the package is built.

Everything else lives in pyproject.toml. The stubs (offload/v1/offload_pb2*.py) are never
committed; generating them here is what lets `pip install .` work from a clean checkout and puts
them in the wheel. grpcio-tools comes from `[build-system] requires`.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = "offload/v1/offload.proto"
STUBS = [ROOT / "offload/v1/offload_pb2.py", ROOT / "offload/v1/offload_pb2_grpc.py"]


def generate_stubs() -> None:
    """Run protoc unless the stubs are newer than the .proto (as `make proto` left them)."""
    proto = ROOT / "protos" / PROTO
    if not proto.exists():
        raise SystemExit(f"{proto} is missing: build from a full checkout or an sdist")
    if all(s.exists() and s.stat().st_mtime >= proto.stat().st_mtime for s in STUBS):
        return
    from grpc_tools import protoc  # noqa: PLC0415  (a build requirement, not a runtime one)

    args = ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}"]
    if protoc.main([*args, str(proto)]) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {proto}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
