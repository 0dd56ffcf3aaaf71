"""Regenerate the Python code for the wire contract.

Usage: ``python scripts/generate.py [--out DIR]`` (default: ``generated/``).

Runs grpcio-tools' protoc over ``protos/`` with the message, gRPC and
mypy-protobuf plugins, then adds the package ``__init__.py`` files, so that the
output is importable as ``dragon.v1``. The test suite runs it into a temporary
folder and fails when the committed ``generated/`` differs.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import sysconfig
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
HEADER = '"""Generated from protos/ by scripts/generate.py; do not edit."""\n'


def _plugin(name: str) -> str:
    found = shutil.which(name) or str(Path(sysconfig.get_path("scripts")) / name)
    if not Path(found).exists():
        sys.exit(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


def generate(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        sys.exit("protoc failed")
    for folder in sorted({p.parent for p in out.rglob("*.py")}):
        while folder != out:
            (folder / "__init__.py").write_text(HEADER)
            folder = folder.parent
    (out / "py.typed").unlink(missing_ok=True)
    for folder in (p for p in out.iterdir() if p.is_dir()):
        (folder / "py.typed").write_text("")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "generated")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()
