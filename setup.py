"""Generate the gRPC/protobuf Python code from protos/ whenever the package is built.

`pip install .` and `pip install -e .` both run this file, so a clean checkout needs no
separate code-generation step and the generated code never goes stale in git.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent.resolve()
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "client"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed for: " + " ".join(protos))
    for package_dir in {(OUT_ROOT / p).parent for p in protos}:
        (package_dir / "py.typed").touch()


if __name__ == "__main__":  # setuptools runs this file as __main__; `make gen` imports it
    # Generated before setup() because egg_info already needs the package directory to exist.
    generate_protos()
    setup()
