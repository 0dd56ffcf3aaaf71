"""The wire contract: committed generated code is fresh and buf lint passes."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_committed_generated_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    out = tmp_path / "generated"
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )

    fresh, committed = _tree(out), _tree(ROOT / "generated")

    assert sorted(fresh) == sorted(committed), "run `make generate` and commit"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files {stale}: run `make generate` and commit"
    assert not filecmp.dircmp(out, ROOT / "generated").diff_files


def test_generated_messages_import_across_files() -> None:
    from dragon.v1 import service_pb2, types_pb2

    grant = service_pb2.SessionResponse(
        lease_grant=types_pb2.Lease(lease_id="l", recipe=types_pb2.Recipe(density=0.01))
    )
    decoded = service_pb2.SessionResponse.FromString(grant.SerializeToString())

    assert decoded.WhichOneof("kind") == "lease_grant"
    assert decoded.lease_grant.recipe.density == pytest.approx(0.01)


def test_buf_lint_passes() -> None:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    found = str(buf) if buf.exists() else shutil.which("buf")
    assert found, "buf is missing: run `make setup` (npm ci installs @bufbuild/buf)"

    result = subprocess.run(
        [found, "lint"], cwd=ROOT, capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stdout + result.stderr
