"""Run the SiteBridge app as a local Flower simulation with ``flwr run .``.

``python -m simulations.simulate --num-supernodes 6 [--run-config 'k=v ...']``

Flower 1.39's ``:local:`` connection starts a detached SuperLink on a fixed port that
outlives the run. This launcher instead starts ``flower-superlink --simulation`` itself
(own ports, in-memory state, runtime dependency installation disabled, telemetry off),
points a connection in a private ``FLWR_HOME`` at it, runs ``flwr run . <connection>
--stream``, and stops the SuperLink by its PID afterwards, also on failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

CONNECTION_NAME = "sitebridge-sim"
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flower_environment(flwr_home: Path) -> dict[str, str]:
    """Environment of Flower processes: private home, no installs, no outbound calls."""
    env = dict(os.environ)
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            "RAY_DEDUP_LOGS": "0",
            # The SuperLink spawns flower-superexec (which spawns the apps) by name:
            # this interpreter's bin folder must come first, even without activation.
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
            ),
        }
    )
    return env


def _tool(name: str) -> str:
    """A Flower console script next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path) -> Iterator[str]:
    """Start a simulation SuperLink; yield its connection name; stop it by PID."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port, control_port = free_port(), free_port()
    (flwr_home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION_NAME}"\n\n'
        f"[superlink.{CONNECTION_NAME}]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    log_path = flwr_home / "superlink.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                _tool("flower-superlink"),
                "--insecure",
                "--simulation",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--control-api-address",
                f"127.0.0.1:{control_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=flower_environment(flwr_home),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"flower-superlink exited with {process.returncode}; see {log_path}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1),
            ):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"flower-superlink not ready after 60 s; see {log_path}"
                )
            time.sleep(0.3)
        yield CONNECTION_NAME
    finally:
        stop_process_group(process)


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group (it started a session), then SIGKILL after 15 s."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


def format_run_config(overrides: Mapping[str, bool | int | float | str]) -> str:
    """Flower ``--run-config`` text: strings quoted, the rest as TOML scalars.

    Example:
        >>> format_run_config({"train.epochs": 2, "federation.dir": "/x"})
        'train.epochs=2 federation.dir="/x"'
    """
    parts = []
    for key, value in overrides.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def read_run_status(connection: str, env: Mapping[str, str]) -> tuple[str, str]:
    """Status and details of the newest run on ``connection`` (via ``flwr ls``)."""
    listing = subprocess.run(
        [_tool("flwr"), "ls", connection, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listing.stdout)["runs"]
    except (ValueError, KeyError):
        return "unknown", f"flwr ls failed: {listing.stderr.strip()[-300:]}"
    if not runs:
        return "unknown", "no run was recorded"
    newest = max(runs, key=lambda run: str(run.get("pending-at", "")))
    return str(newest.get("status", "unknown")), str(newest.get("status-details", ""))


def run_simulation(
    *,
    num_supernodes: int,
    run_config: str,
    flwr_home: Path,
    app_dir: Path = REPO_ROOT,
    timeout_s: float | None = None,
) -> int:
    """``flwr run`` the app on a private simulation SuperLink; return an exit code.

    Output streams to this process's stdout. ``flwr run --stream`` exits 0 even when
    the ServerApp raised, so the run's final status is read back: 0 only for
    ``finished:completed``. ``timeout_s`` bounds the run (the SuperLink is stopped
    either way).
    """
    with simulation_superlink(flwr_home) as connection:
        env = flower_environment(flwr_home)
        command = [
            _tool("flwr"),
            "run",
            str(app_dir),
            connection,
            "--stream",
            "--federation-config",
            f"num-supernodes={num_supernodes}",
        ]
        if run_config:
            command += ["--run-config", run_config]
        completed = subprocess.run(command, env=env, timeout=timeout_s, check=False)
        if completed.returncode != 0:
            return completed.returncode
        status, details = read_run_status(connection, env)
        if status != "finished:completed":
            print(f"the run ended as {status}: {details}", file=sys.stderr, flush=True)
            return 1
        return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.simulate", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        required=True,
        help="one per site folder of the federation",
    )
    parser.add_argument(
        "--run-config",
        default="",
        help="Flower run-config overrides, e.g. 'train.epochs=5'",
    )
    parser.add_argument("--flwr-home", type=Path, default=REPO_ROOT / ".flwr-home")
    args = parser.parse_args(argv)
    return run_simulation(
        num_supernodes=args.num_supernodes,
        run_config=args.run_config,
        flwr_home=args.flwr_home.resolve(),
    )


if __name__ == "__main__":
    sys.exit(main())
