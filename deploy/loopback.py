"""Loopback deployment harness: the ``deploy/*.sh`` scripts driven on one machine.

A real SuperLink (TLS, SuperNode authentication, SQLite) and one SuperNode per site run
on 127.0.0.1 with free ports, started, registered and stopped by the same scripts an
operator runs, so the scripts are what is tested. The harness adds what a test needs:
approving the app bundle at every site (``sitebridge site approve``, as a site's IT
does), ``flwr run`` submission and run status, killing and restarting a SuperNode,
adding and removing a site, finding the ServerApp, misconfigured SuperNodes that must be
refused, and a guarantee that every process it started, with every process those
started, is gone at the end.

Example:
    with LoopbackDeployment(root, [SiteNode(name="A", site_dir=site_a)]) as deployment:
        run_id = deployment.submit_run({"federation.dir": str(federation)})
        status = deployment.wait_for_run(run_id, timeout_s=900)

Which processes are the harness's, and whether they are gone, is :mod:`deploy.processes`
(PID *and* start time, never names); its public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, TypeVar

from deploy.processes import (
    LeftoverProcessesError,
    ProcessRecord,
    ProcessTracker,
    is_running,
    read_process,
)
from simulations.simulate import flower_environment, format_run_config, free_port

__all__ = [
    "CLI_TIMEOUT_S",
    "CONNECTION",
    "MARKER_VARIABLE",
    "REFUSED_MAX_RETRIES",
    "REFUSED_MAX_WAIT_S",
    "REPO_ROOT",
    "SCRIPTS_DIR",
    "SCRIPT_VARIABLES",
    "DeploymentError",
    "ForegroundNode",
    "LeftoverProcessesError",
    "LoopbackDeployment",
    "ProcessRecord",
    "SiteNode",
    "is_running",
    "read_process",
    "wait_until",
]

SCRIPTS_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = SCRIPTS_DIR.parent
CONNECTION: Final = "sitebridge-loopback"
# Every process the harness starts inherits this variable (value: one id per harness),
# so that its descendants can be found even after their parent died.
MARKER_VARIABLE: Final = "SITEBRIDGE_LOOPBACK_ID"
# Variables the scripts read that must not leak in from the caller's environment.
SCRIPT_VARIABLES: Final = (
    *("SITEBRIDGE_DEPLOY_DIR", "SITEBRIDGE_VENV", "SITEBRIDGE_CA_CERT"),
    *("SUPERLINK_SAN", "SUPERLINK_CN", "SUPERLINK_DATABASE", "SUPERLINK_FLWR_HOME"),
    *("SITE_DIR", "SITE_POLICY", "SITE_STATE_DIR", "SUPERNODE_KEY"),
    *("SUPERNODE_FLWR_HOME", "SUPERNODE_HOST", "SUPERNODE_PORT"),
    *("SUPERNODE_MAX_RETRIES", "SUPERNODE_MAX_WAIT_TIME", "SUPERNODE_START_TIMEOUT_S"),
)
# A refused SuperNode gives up after this many tries / seconds (production: unbounded).
REFUSED_MAX_RETRIES: Final = 2
REFUSED_MAX_WAIT_S: Final = 30
CLI_TIMEOUT_S: Final = 120.0
# What `flwr` prints when the SuperLink failed one Control API call internally, e.g.
# "database is locked" in its log (SQLite state,
# docs/deployment.md#flower-139-behaviours-the-scripts-rely-on) on a loaded host.
TRANSIENT_CONTROL_ERROR: Final = "Internal server error."

T = TypeVar("T")


class DeploymentError(RuntimeError):
    """A script or ``flwr`` command failed, or a deadline passed."""


# SiteBridge's namespace (core/logs.py), through the standard library: deploy/ imports
# nothing of core. Whoever runs the harness configures logging (core.logs), as the
# integration test does.
LOGGER = logging.getLogger("sitebridge.loopback")


def _log(line: str) -> None:
    LOGGER.info("%s", line)


def wait_until(
    predicate: Callable[[], T | None],
    *,
    timeout_s: float,
    what: str,
    poll_s: float = 1.0,
) -> T:
    """Poll ``predicate`` until it returns a truthy value, and return that value.

    Raises:
        DeploymentError: ``timeout_s`` passed first (the message says ``what``).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeploymentError(
                f"timed out after {timeout_s:.0f} s waiting for {what}"
            )
        time.sleep(poll_s)


# --- the deployment ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteNode:
    """A site's SuperNode: its name, its folder and optional policy and state dir."""

    name: str
    site_dir: Path
    policy: Path | None = None
    state_dir: Path | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ForegroundNode:
    """A SuperNode the harness runs as its own child (to read its exit status)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def wait(self, timeout_s: float) -> int:
        """Wait for the node to exit; return its exit status."""
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise DeploymentError(
                f"SuperNode {self.name} still runs after {timeout_s:.0f} s; see "
                f"{self.log_path}"
            ) from error

    def log_text(self) -> str:
        """Everything the node wrote so far."""
        return self.log_path.read_text(errors="replace")


class LoopbackDeployment:
    """A TLS + SuperNode-auth deployment on 127.0.0.1, run by the deploy/ scripts.

    Use it as a context manager: entering starts everything (CA, site keys, SuperLink,
    CLI connection, registrations, SuperNodes) and waits until every SuperNode is
    online; leaving stops every process it started, also after an exception, and
    raises :class:`LeftoverProcessesError` if any survived.

    Args:
        root: the deployment dir (created; certs/, keys/, state/, logs/, flwr-home/).
        sites: one SuperNode per site.
        app_dir: the Flower app ``flwr run`` submits (this repository).
        online_timeout_s: how long to wait for the SuperNodes to come online.
        stop_grace_s: how long stopped daemons' children get to exit on their own.
    """

    def __init__(
        self,
        root: Path,
        sites: Sequence[SiteNode],
        *,
        app_dir: Path = REPO_ROOT,
        online_timeout_s: float = 180.0,
        stop_grace_s: float = 15.0,
    ) -> None:
        self.root = root.resolve()
        self.sites = {site.name: site for site in sites}
        self.app_dir = app_dir.resolve()
        self.online_timeout_s = online_timeout_s
        self.stop_grace_s = stop_grace_s
        self.flwr_home = self.root / "flwr-home"
        self.fleet_address = f"127.0.0.1:{free_port()}"
        self.control_port = free_port()
        self.node_ports = {name: free_port() for name in self.sites}
        self.node_ids: dict[str, int] = {}
        self.timings_s: dict[str, float] = {}
        self.approved_bundle: str | None = None
        self._marker = uuid.uuid4().hex
        self._processes = ProcessTracker(f"{MARKER_VARIABLE}={self._marker}".encode())
        self._children: list[ForegroundNode] = []
        self._closed = False

    # -- environment and commands ----------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """Environment of every script and ``flwr`` command the harness runs."""
        env = flower_environment(self.flwr_home)
        for name in SCRIPT_VARIABLES:
            env.pop(name, None)
        env.update(
            {
                "SITEBRIDGE_DEPLOY_DIR": str(self.root),
                "SITEBRIDGE_CONNECTION": CONNECTION,
                "FLEET_ADDRESS": self.fleet_address,
                "SUPERLINK_FLEET_ADDRESS": self.fleet_address,
                "CONTROL_HOST": "127.0.0.1",
                "CONTROL_PORT": str(self.control_port),
                # Same checks as 4096 bits, whose primes cost seconds on 2 cores.
                "RSA_BITS": "2048",
                MARKER_VARIABLE: self._marker,
            }
        )
        return env

    def run_script(
        self, name: str, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``deploy/<name>`` (whatever its exit status); echo its messages."""
        completed = subprocess.run(
            ["bash", str(SCRIPTS_DIR / name), *args],
            cwd=self.root,
            env={**self.env, **(extra_env or {})},
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        for line in completed.stderr.splitlines():
            _log(line)
        return completed

    def _script(
        self, name: str, *args: str, extra_env: Mapping[str, str] | None = None
    ) -> str:
        """Run ``deploy/<name>``; echo its messages; return its stdout."""
        completed = self.run_script(name, *args, extra_env=extra_env)
        if completed.returncode != 0:
            raise DeploymentError(
                f"{name} {' '.join(args)} exited with {completed.returncode}:\n"
                f"{completed.stderr.strip()}"
            )
        return completed.stdout

    def _flwr(self, *args: str, cwd: Path | None = None) -> str:
        """Run ``flwr <args>`` against this deployment; return its stdout."""
        beside = Path(sys.executable).parent / "flwr"
        completed = subprocess.run(
            [str(beside) if beside.exists() else "flwr", *args],
            cwd=cwd or self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            check=False,
        )
        if completed.returncode != 0:
            raise DeploymentError(
                f"flwr {' '.join(args[:2])} exited with {completed.returncode}:\n"
                f"{completed.stdout.strip()[-2000:]}\n{completed.stderr.strip()[-2000:]}"
            )
        return completed.stdout

    def _flwr_json(self, *args: str, cwd: Path | None = None) -> dict[str, object]:
        output = self._flwr(*args, "--format", "json", cwd=cwd)
        try:
            payload = json.loads(output)
        except ValueError as error:
            raise DeploymentError(
                f"flwr {args[0]}: not JSON: {output[-500:]}"
            ) from error
        if not isinstance(payload, dict) or not payload.get("success"):
            raise DeploymentError(f"flwr {' '.join(args[:2])} failed: {payload}")
        return payload

    # -- paths -----------------------------------------------------------------

    @property
    def superlink_log(self) -> Path:
        """The SuperLink's log file."""
        return self.root / "logs" / "superlink.log"

    def supernode_log(self, site: str) -> Path:
        """The log file of ``site``'s SuperNode."""
        return self.root / "logs" / f"supernode-{site}.log"

    def app_log(self, site: str) -> Path:
        """The log file of ``site``'s app process (``sitebridge-serve``)."""
        return self.root / "logs" / f"sitebridge-app-{site}.log"

    def site_state_dir(self, site: str) -> Path:
        """Where ``site`` keeps its ledger and approvals (start-supernode.sh's rule)."""
        node = self.sites[site]
        return node.state_dir or node.site_dir / ".sitebridge"

    # -- approvals -------------------------------------------------------------

    @staticmethod
    def bundle_sha256(app_dir: Path) -> str:
        """The SHA-256 of the bundle ``flwr run <app_dir>`` submits (same build)."""
        from flwr.cli.build import build_fab_from_disk

        from core.privacy.approvals import bundle_sha256

        return bundle_sha256(build_fab_from_disk(app_dir.resolve()))

    def approve_app(
        self, app_dir: Path | None = None, *, sites: Iterable[str] | None = None
    ) -> str:
        """Approve the bundle of ``app_dir`` (default: the harness's app) at sites.

        Runs ``sitebridge site approve --state-dir <state> <sha256>`` per site, as a
        site's IT would after reviewing the release; returns the SHA-256.
        """
        digest = self.bundle_sha256(app_dir or self.app_dir)
        beside = Path(sys.executable).parent / "sitebridge"
        for site in self.sites if sites is None else sites:
            command = [
                str(beside) if beside.exists() else "sitebridge",
                *("site", "approve", "--state-dir", str(self.site_state_dir(site))),
                *(digest, "--note", "loopback harness"),
            ]
            completed = subprocess.run(
                command, capture_output=True, text=True, check=False
            )
            if completed.returncode != 0:
                raise DeploymentError(
                    f"sitebridge site approve at {site} failed: {completed.stderr}"
                )
        if app_dir is None or app_dir.resolve() == self.app_dir:
            self.approved_bundle = digest
        _log(f"approved bundle {digest[:12]} at {sorted(sites or self.sites)}")
        return digest

    # -- lifecycle -------------------------------------------------------------

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            with contextlib.suppress(LeftoverProcessesError):
                self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LeftoverProcessesError as error:
            if exc_type is None:
                raise
            _log(f"while handling {exc_type.__name__}: {error}")

    def start(self) -> None:
        """Create keys and certificates, start everything, wait until all are online.

        Records how long each step took, from the start, in ``timings_s``.
        """
        started = time.monotonic()

        def reached(step: str) -> None:
            self.timings_s[step] = time.monotonic() - started
            _log(f"{step}: {self.timings_s[step]:.1f} s after start")

        self.root.mkdir(parents=True, exist_ok=True)
        _log(f"deployment dir {self.root}")
        self._script("make-ca.sh")
        for name in self.sites:
            self._script("make-site-key.sh", name)
        reached("certificates-and-keys")
        self._script("start-superlink.sh")
        self._track_pid_file(self.root / "state" / "superlink.pid")
        reached("superlink-healthy")
        self._script("write-connection.sh")
        for name in self.sites:
            public_key = str(self.root / "keys" / f"{name}.pub")
            self.node_ids[name] = int(
                self._script("register-site.sh", public_key, name)
            )
        reached("sites-registered")
        self.approve_app()
        reached("bundle-approved")
        for name in self.sites:
            self.start_supernode(name)
        self.wait_for_online(self.sites, timeout_s=self.online_timeout_s)
        reached("all-online")

    def close(self) -> None:
        """Stop every process the harness started, by PID; check that none is left.

        SuperNodes and the SuperLink are stopped by their stop scripts (SIGTERM, then
        SIGKILL after 10 s); their children get ``stop_grace_s`` to exit on their own,
        then SIGTERM, then SIGKILL. Idempotent.

        Raises:
            LeftoverProcessesError: some process survived all of that.
        """
        if self._closed:
            return
        self._closed = True
        self._processes.refresh()
        for name in self.sites:
            with contextlib.suppress(DeploymentError, subprocess.TimeoutExpired):
                self._script("stop-supernode.sh", name)
        for node in self._children:
            if node.process.poll() is None:
                node.process.terminate()
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait(timeout=10)
        if (self.root / "state" / "superlink.pid").exists():
            with contextlib.suppress(DeploymentError, subprocess.TimeoutExpired):
                self._script("stop-superlink.sh")
        leftovers = self._processes.wait_gone(self.stop_grace_s)
        for sig, grace_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not leftovers:
                break
            for record in leftovers:
                _log(f"sending {sig.name} to leftover {record.pid}: {record.command}")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record.pid, sig)
            leftovers = self._processes.wait_gone(grace_s)
        if leftovers:
            raise LeftoverProcessesError(
                "processes left after stopping the deployment: "
                + "; ".join(f"{record.pid} {record.command}" for record in leftovers)
            )
        _log(
            f"stopped; all {len(self._processes.records)} processes it started are gone"
        )

    # -- process tracking ------------------------------------------------------

    def _track_pid_file(self, pid_file: Path) -> int:
        pid = int(pid_file.read_text().strip())
        if self._processes.track(pid) is None:
            raise DeploymentError(
                f"the process of {pid_file} (PID {pid}) is not running"
            )
        return pid

    def tracked_processes(self) -> list[ProcessRecord]:
        """Every process the harness started or saw descend from one, so far."""
        return self._processes.tracked()

    def marked_processes(self) -> list[ProcessRecord]:
        """Running processes that carry this harness's marker variable."""
        return self._processes.marked()

    @property
    def superlink_pid(self) -> int | None:
        """The SuperLink's PID while it runs."""
        return self._pid_from_file(
            self.root / "state" / "superlink.pid", "flower-superlink"
        )

    def supernode_pid(self, site: str) -> int | None:
        """The PID of ``site``'s SuperNode while it runs."""
        return self._pid_from_file(
            self.root / "state" / f"supernode-{site}.pid", "flower-supernode"
        )

    def app_pid(self, site: str) -> int | None:
        """The PID of ``site``'s app process (``sitebridge-serve``) while it runs."""
        return self._pid_from_file(
            self.root / "state" / f"sitebridge-app-{site}.pid", "sitebridge-serve"
        )

    def _pid_from_file(self, pid_file: Path, name: str) -> int | None:
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        record = read_process(pid)
        return pid if record is not None and name in record.command else None

    def serverapp_pids(self) -> list[int]:
        """PIDs of the ``flwr-serverapp`` processes under this harness's SuperLink."""
        superlink = self.superlink_pid
        if superlink is None:
            return []
        return [
            record.pid
            for record in self._processes.descendants(superlink)
            if "flwr-serverapp" in record.command
        ]

    # -- SuperNodes ------------------------------------------------------------

    def start_supernode(self, site: str) -> int:
        """Start ``site``'s SuperNode with start-supernode.sh; return its PID."""
        node = self.sites[site]
        args = ["--site-dir", str(node.site_dir), "--port", str(self.node_ports[site])]
        if node.policy is not None:
            args += ["--policy", str(node.policy)]
        if node.state_dir is not None:
            args += ["--state-dir", str(node.state_dir)]
        self._script("start-supernode.sh", *args, site)
        self._track_pid_file(self.root / "state" / f"sitebridge-app-{site}.pid")
        return self._track_pid_file(self.root / "state" / f"supernode-{site}.pid")

    def stop_supernode(
        self,
        site: str,
        sig: signal.Signals = signal.SIGTERM,
        *,
        timeout_s: float = 60.0,
    ) -> None:
        """Stop ``site``'s SuperNode: SIGTERM via stop-supernode.sh, else ``sig``.

        Any other signal (SIGKILL for a crash) is sent to the SuperNode's PID alone;
        this returns once that process is gone. Its children are tracked first, so
        :meth:`close` stops them too if they outlive it.
        """
        pid = self.supernode_pid(site)
        if pid is None:
            raise DeploymentError(f"the SuperNode of {site} is not running")
        self._processes.descendants(pid)
        if sig == signal.SIGTERM:
            self._script("stop-supernode.sh", site)
            return
        record = self._processes.records[pid]
        _log(f"sending {sig.name} to the SuperNode of {site} (PID {pid})")
        os.kill(pid, sig)
        wait_until(
            lambda: not is_running(record),
            timeout_s=timeout_s,
            what=f"the SuperNode of {site} to exit",
            poll_s=0.2,
        )

    def list_supernodes(self) -> list[dict[str, object]]:
        """``flwr supernode list --format json``: one dict per registered node."""
        nodes = self._flwr_json("supernode", "list", CONNECTION)["nodes"]
        if not isinstance(nodes, list):
            raise DeploymentError(f"flwr supernode list: {nodes}")
        return nodes

    def node_statuses(self) -> dict[int, str]:
        """Node id -> status ("registered", "online", "offline", ...)."""
        return {
            int(str(node["node-id"])): str(node["status"])
            for node in self.list_supernodes()
        }

    def wait_for_online(self, sites: Iterable[str], *, timeout_s: float) -> None:
        """Wait until the SuperNodes of ``sites`` are all online."""
        wanted = {self.node_ids[site] for site in sites}

        def all_online() -> bool:
            self._processes.refresh()
            statuses = self.node_statuses()
            return all(statuses.get(node) == "online" for node in wanted)

        wait_until(all_online, timeout_s=timeout_s, what="SuperNodes online")

    def _foreground(
        self, name: str, command: list[str], env: dict[str, str]
    ) -> ForegroundNode:
        log_path = self.supernode_log(name)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command,
                cwd=self.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        node = ForegroundNode(name=name, process=process, log_path=log_path)
        self._children.append(node)
        self._processes.track(process.pid)
        return node

    def try_start_supernode(
        self,
        name: str,
        *,
        site_dir: Path,
        extra_env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run start-supernode.sh for a site that may be refused; return its result.

        A key is made with make-site-key.sh if ``name`` has none (and is never
        registered here). The script waits up to ``timeout_s`` for the coordinator's
        answer (SUPERNODE_START_TIMEOUT_S) and, when refused, stops what it started
        and exits non-zero saying why.
        """
        if not (self.root / "keys" / name).exists():
            self._script("make-site-key.sh", name)
        env = {
            "SUPERNODE_PORT": str(free_port()),
            "SUPERNODE_START_TIMEOUT_S": str(int(timeout_s)),
            **(extra_env or {}),
        }
        completed = self.run_script(
            "start-supernode.sh", "--site-dir", str(site_dir), name, extra_env=env
        )
        self._processes.refresh()
        return completed

    def add_site(self, node: SiteNode) -> int:
        """Register a new site, approve the bundle there and start it; its node id."""
        self.sites[node.name] = node
        self.node_ports[node.name] = free_port()
        self._script("make-site-key.sh", node.name)
        public_key = str(self.root / "keys" / f"{node.name}.pub")
        node_id = int(self._script("register-site.sh", public_key, node.name))
        self.node_ids[node.name] = node_id
        self.approve_app(sites=[node.name])
        self.start_supernode(node.name)
        self.wait_for_online([node.name], timeout_s=self.online_timeout_s)
        return node_id

    def remove_site(self, name: str) -> None:
        """Stop a site's processes and unregister its key; it leaves the harness.

        Uses stop-supernode.sh and ``flwr supernode unregister``.
        """
        self._script("stop-supernode.sh", name)
        self._flwr("supernode", "unregister", str(self.node_ids[name]), CONNECTION)
        del self.sites[name], self.node_ports[name], self.node_ids[name]

    def start_insecure_supernode(self, name: str, *, site_dir: Path) -> ForegroundNode:
        """A SuperNode without TLS or key, dialling the TLS Fleet API (refused).

        The scripts never start an insecure node, so this runs flower-supernode itself.
        """
        home = self.root / "state" / f"supernode-{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        beside = Path(sys.executable).parent / "flower-supernode"
        command = [
            str(beside) if beside.exists() else "flower-supernode",
            "--insecure",
            "--grpc-rere",
            "--superlink",
            self.fleet_address,
            "--max-retries",
            str(REFUSED_MAX_RETRIES),
            "--max-wait-time",
            str(REFUSED_MAX_WAIT_S),
            "--node-config",
            f'site-dir="{site_dir}"',
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ]
        return self._foreground(name, command, {**self.env, "FLWR_HOME": str(home)})

    # -- runs ------------------------------------------------------------------

    def submit_run(
        self,
        run_config: Mapping[str, bool | int | float | str],
        *,
        app_dir: Path | None = None,
    ) -> int:
        """``flwr run <app> <connection>`` (not streaming); return the run id.

        ``app_dir`` defaults to the harness's app, whose bundle the sites approved.
        """
        app = (app_dir or self.app_dir).resolve()
        args = ["run", str(app), CONNECTION]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        payload = self._flwr_json(*args, cwd=app)
        run_id = int(str(payload["run-id"]))
        _log(f"submitted run {run_id}")
        return run_id

    def stop_run(self, run_id: int) -> None:
        """``flwr stop <run-id>``: the SuperLink marks the run ``finished:stopped``.

        For a run whose ServerApp died, this ends it at once instead of when the
        ServerApp's heartbeat expires (about a minute; see
        docs/deployment.md#flower-139-behaviours-the-scripts-rely-on).
        """
        self._flwr("stop", str(run_id), CONNECTION)
        _log(f"stopped run {run_id}")

    def run_info(self, run_id: int) -> dict[str, object]:
        """``flwr ls --run-id`` of ``run_id`` as a dict (status, timestamps, ...)."""
        runs = self._flwr_json("ls", CONNECTION, "--run-id", str(run_id))["runs"]
        if not isinstance(runs, list) or len(runs) != 1:
            raise DeploymentError(f"flwr ls --run-id {run_id}: {runs}")
        info: dict[str, object] = runs[0]
        return info

    def run_status(self, run_id: int) -> str:
        """The run's status, e.g. ``running`` or ``finished:completed``."""
        return str(self.run_info(run_id)["status"])

    def wait_for_run(self, run_id: int, *, timeout_s: float = 900.0) -> str:
        """Wait until the run has finished; return its final status."""
        started = time.monotonic()

        def finished() -> str | None:
            self._processes.refresh()
            try:
                status = self.run_status(run_id)
            except DeploymentError as error:
                # On a busy host the SuperLink's SQLite state is sometimes locked for
                # longer than its timeout, and the Control API answers that one query
                # with "Internal server error"; the next poll gets through.
                if TRANSIENT_CONTROL_ERROR not in str(error):
                    raise
                _log(f"flwr ls of run {run_id} failed transiently; polling on")
                return None
            return status if status.startswith("finished") else None

        status = wait_until(
            finished, timeout_s=timeout_s, what=f"run {run_id} to finish", poll_s=2.0
        )
        self.timings_s[f"run-{run_id}"] = time.monotonic() - started
        _log(
            f"run {run_id} {status} after {time.monotonic() - started:.1f} s of waiting"
        )
        return status

    def run_log(self, run_id: int) -> str:
        """The run's log so far (``flwr log <run-id> --show``)."""
        return self._flwr("log", str(run_id), CONNECTION, "--show")
