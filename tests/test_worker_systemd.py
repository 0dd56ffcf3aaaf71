"""The shipped systemd unit parses cleanly and says what a volunteer needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dragon_worker.cli import main, unit_text

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_unit_runs_a_dedicated_user_with_state_and_hardening() -> None:
    directives = _directives(unit_text())

    assert directives["DynamicUser"] == ["yes"]
    assert directives["StateDirectory"] == ["dragon-worker"]
    assert directives["Restart"] == ["on-failure"]
    # Longer than a drain: the first SIGTERM finishes and uploads the lease.
    assert int(directives["TimeoutStopSec"][0]) >= 600
    assert directives["EnvironmentFile"] == ["-/etc/dragon-worker.env"]
    assert directives["ExecStart"][0].endswith("dragon-worker run")
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert directives[key] == ["yes"], key
    assert directives["ProtectSystem"] == ["strict"]


def test_systemd_unit_command_points_at_this_installation(tmp_path: Path) -> None:
    printed = CliRunner().invoke(main, ["systemd-unit"])
    assert printed.exit_code == 0
    exec_start = _directives(printed.stdout)["ExecStart"][0]
    executable = exec_start.split()[0]
    assert Path(executable).is_file()
    assert Path(executable).name == "dragon-worker"

    target = tmp_path / "etc" / "dragon-worker.service"
    installed = CliRunner().invoke(
        main, ["systemd-unit", "--install", "--path", str(target)]
    )
    assert installed.exit_code == 0, installed.output
    assert target.read_text() == printed.stdout


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    # verify checks that ExecStart exists: point it at a real executable.
    unit = tmp_path / "dragon-worker.service"
    unit.write_text(unit_text().replace("/usr/local/bin/dragon-worker", sys.executable))

    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    # Unknown keys and bad values are only warnings with exit code 0.
    complaints = [
        line for line in result.stderr.splitlines() if "dragon-worker" in line
    ]
    assert complaints == []


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    unit = tmp_path / "dragon-worker.service"
    broken = unit_text().replace("/usr/local/bin/dragon-worker", sys.executable)
    unit.write_text(broken.replace("Restart=on-failure", "Restart=sometimes"))

    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert "restart specifier" in result.stderr


@pytest.mark.parametrize(
    ("executable", "hidden"),
    [
        pytest.param("/tmp/venv/bin/dragon-worker", "/tmp", id="tmp"),
        pytest.param("/home/ada/.local/bin/dragon-worker", "/home", id="home"),
        pytest.param("/root/venv/bin/dragon-worker", "/root", id="root"),
        pytest.param("/opt/dragon/bin/dragon-worker", None, id="opt"),
        pytest.param("/usr/local/bin/dragon-worker", None, id="usr-local"),
    ],
)
def test_an_install_the_sandbox_hides_is_named(
    executable: str, hidden: str | None
) -> None:
    from dragon_worker.cli import _hidden_from_the_service

    assert _hidden_from_the_service(Path(executable)) == hidden
