"""The pipeline over a real gRPC + TLS deployment with SuperNode auth, on loopback.

One harness (deploy/loopback.py) serves the whole module: a SuperLink and three
SuperNodes started by the deploy/ scripts. The tests: an uninterrupted run (also the
baseline), refusal of an unregistered key and of a node without TLS, a ServerApp
killed mid-run and resumed with ``resume-run``, a SuperNode killed mid-phase (dropout),
and at the end, that every process the harness started is gone. Every wait is on an
event (a file, a run status, a process exit, a log line) with a generous deadline,
never a fixed sleep. The last test stops the harness: keep it last.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from core.cli import main as sitebridge
from core.synthetic import write_federation
from deploy.loopback import (
    ForegroundNode,
    LoopbackDeployment,
    SiteNode,
    is_running,
    wait_until,
)

pytestmark = pytest.mark.integration

SITES = ("A", "B", "C")
RUN_TIMEOUT_S = 900.0
REFUSAL_TIMEOUT_S = 180.0
# The target releases LFTM per case (through a policy file named by --node-config).
TARGET_POLICY = (
    (Path(__file__).resolve().parents[2] / "deploy" / "policy.template.toml")
    .read_text()
    .replace('lftm = "domain"', 'lftm = "instance"')
)


@pytest.fixture(scope="module")
def loopback_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's scratch folder: federation, policies, site state, deployment."""
    return tmp_path_factory.mktemp("loopback")


@pytest.fixture(scope="module")
def deployed_federation(loopback_root: Path) -> Path:
    """Three synthetic sites; A's policy lives outside its folder, B's state too."""
    folder = loopback_root / "federation"
    write_federation(folder, seed=3, num_sites=3, num_train_cases=3)
    return folder


@pytest.fixture(scope="module")
def deployment(
    loopback_root: Path, deployed_federation: Path
) -> Iterator[LoopbackDeployment]:
    """One SuperLink + three SuperNodes for the module, stopped at its end."""
    policy = loopback_root / "policies" / "A.toml"
    policy.parent.mkdir()
    policy.write_text(TARGET_POLICY)
    sites = [
        SiteNode(name="A", site_dir=deployed_federation / "A", policy=policy),
        SiteNode(
            name="B",
            site_dir=deployed_federation / "B",
            state_dir=loopback_root / "site-state" / "B",
        ),
        SiteNode(name="C", site_dir=deployed_federation / "C"),
    ]
    with LoopbackDeployment(loopback_root / "deploy", sites) as harness:
        yield harness


def tiny_run_config(
    runs_dir: Path, **overrides: bool | int | float | str
) -> dict[str, bool | int | float | str]:
    """test_simulation.py's tiny settings, as a real coordinator runs them.

    The coordinator sees no site folder: it waits for three SuperNodes and is told
    the target; each site serves the folder its SuperNode's --node-config names.
    """
    return {
        "federation.expected-sites": len(SITES),
        "federation.target-site": "A",
        "output.runs-dir": str(runs_dir),
        "data.image-size": 32,
        "data.max-slices-per-case": 4,
        "train.epochs": 3,
        "adapt.epochs": 1,
        "consensus.epochs": 1,
        "consensus.refine-epochs": 1,
        # Each semisup round is two more message batches, and every batch starts a
        # ClientApp process per site here; the Flower simulation test and the unit
        # tests cover the phase, so the deployment runs keep CI inside its budget.
        "semisup.enabled": False,
        # The same for the affinity phase (a profile batch and one batch per
        # fine-tuning step); the Flower simulation test runs it.
        "affinity.enabled": False,
        "model.channels": "8,16,32",
        "model.strides": "2,2",
        "federation.min-sites": 1,
        "federation.reply-timeout-s": 300.0,
        **overrides,
    }


def phase_results(run_dir: Path) -> dict[str, object]:
    """Every phase's persisted result, without what differs between two runs."""

    def comparable(value: object) -> object:
        if isinstance(value, dict):
            return {
                key: comparable(item)
                for key, item in value.items()
                if key not in {"node_id", "seconds"}
            }
        if isinstance(value, list):
            return [comparable(item) for item in value]
        return value

    return {
        path.stem: comparable(json.loads(path.read_text()))
        for path in sorted((run_dir / "phases").glob("*.json"))
    }


@pytest.fixture(scope="module")
def baseline_run(
    deployment: LoopbackDeployment, loopback_root: Path
) -> tuple[int, str, Path]:
    """One uninterrupted run: (run id, final status, run folder)."""
    runs = loopback_root / "runs-baseline"
    run_id = deployment.submit_run(tiny_run_config(runs))
    status = deployment.wait_for_run(run_id, timeout_s=RUN_TIMEOUT_S)
    if status != "finished:completed":
        print(deployment.run_log(run_id)[-4000:])
    return run_id, status, runs / str(run_id)


def only_registered_nodes_online(deployment: LoopbackDeployment) -> None:
    """The three registered SuperNodes are online, and no other node is known."""
    deployment.wait_for_online(SITES, timeout_s=REFUSAL_TIMEOUT_S)
    assert set(deployment.node_statuses()) == set(deployment.node_ids.values())


def test_flwr_run_completes_the_pipeline_over_tls(
    baseline_run: tuple[int, str, Path],
    deployed_federation: Path,
    loopback_root: Path,
) -> None:
    # Execute: the run itself is the module's baseline
    _run_id, status, run_dir = baseline_run

    # Assert
    assert status == "finished:completed"
    report = json.loads((run_dir / "report.json").read_text())
    roles = {site["name"]: site["role"] for site in report["sites"]}
    assert roles == {"A": "target", "B": "source", "C": "source"}
    assert report["transferability"]["release"] == "instance"  # A's --policy file
    assert set(report["privacy"]) == set(SITES)
    assert (run_dir / "report.md").read_text().startswith("# SiteBridge run")
    assert set(report["phase_seconds"]) == {
        "discover",
        "source-training",
        "transferability",
        "adaptation",
        "consensus",
        "evaluation",
    }
    # B keeps its ledger in the --state-dir given to its SuperNode, not in its folder.
    b_ledger = loopback_root / "site-state" / "B" / "ledger.jsonl"
    assert sitebridge(["audit", "verify", str(b_ledger)]) == 0
    assert not (deployed_federation / "B" / ".sitebridge").exists()
    assert sitebridge(["audit", "verify", str(run_dir / "ledger.jsonl")]) == 0


@pytest.mark.parametrize(
    ("name", "start", "node_says", "superlink_says"),
    [
        pytest.param(
            "rogue",
            # a key made by make-site-key.sh but never registered
            LoopbackDeployment.start_unregistered_supernode,
            "[code: 2004] Failed to activate SuperNode",
            "No SuperNode found with the given public key",
            id="unregistered-key",
        ),
        pytest.param(
            "plaintext",
            # --insecure and no key, against the TLS Fleet port: the TLS server
            # closes the plain-text connection. (The SuperLink's gRPC core logs the
            # failed handshake, WRONG_VERSION_NUMBER, only sometimes: not asserted.)
            LoopbackDeployment.start_insecure_supernode,
            "failed to connect to all addresses",
            None,
            id="no-tls",
        ),
    ],
)
def test_a_supernode_is_refused(
    deployment: LoopbackDeployment,
    deployed_federation: Path,
    name: str,
    start: Callable[..., ForegroundNode],
    node_says: str,
    superlink_says: str | None,
) -> None:
    # Prepare
    superlink_log_start = deployment.superlink_log.stat().st_size

    # Execute
    node = start(deployment, name, site_dir=deployed_federation / "A")
    exit_code = node.wait(timeout_s=REFUSAL_TIMEOUT_S)

    # Assert: Flower logs its own exit code 305; the process exits with status 1.
    log = node.log_text()
    assert exit_code != 0, log
    assert "Exit Code: 305" in log
    assert node_says in log
    if superlink_says is not None:
        superlink_log = deployment.superlink_log
        wait_until(
            lambda: superlink_says in read_from(superlink_log, superlink_log_start),
            timeout_s=60,
            what=f"the SuperLink to log {superlink_says!r}",
        )
    only_registered_nodes_online(deployment)


def test_a_killed_serverapp_resumes_to_the_uninterrupted_results(
    deployment: LoopbackDeployment,
    baseline_run: tuple[int, str, Path],
    loopback_root: Path,
) -> None:
    # Prepare: a run whose ServerApp process is killed once source training is saved
    runs = loopback_root / "runs-resume"
    killed = deployment.submit_run(tiny_run_config(runs))
    run_dir = runs / str(killed)
    wait_until(
        lambda: (run_dir / "phases" / "source-training.json").is_file(),
        timeout_s=RUN_TIMEOUT_S,
        what="source training to be persisted",
        poll_s=0.2,
    )
    serverapps = deployment.serverapp_pids()
    assert len(serverapps) == 1
    os.kill(serverapps[0], signal.SIGKILL)
    # The operator stops the dead run; Flower itself would mark it failed only once
    # the ServerApp's heartbeat expired, about a minute later (DEPLOY.md G6). Do not
    # resume before it has finished: with both runs open, the SuperLink's SQLite state
    # was locked, its ServerApp launcher died on the error and no later run started.
    deployment.stop_run(killed)
    stopped = deployment.wait_for_run(killed, timeout_s=RUN_TIMEOUT_S)
    assert stopped == "finished:stopped"
    assert not (run_dir / "phases" / "evaluation.json").exists()

    # Execute: a new run resumes the killed one (run ids exceed TOML's int64: quoted)
    resumed = deployment.submit_run(
        tiny_run_config(runs, **{"resume-run": str(killed)})
    )
    status = deployment.wait_for_run(resumed, timeout_s=RUN_TIMEOUT_S)

    # Assert: finished phases reloaded, the rest run, results as if never killed
    assert status == "finished:completed", deployment.run_log(resumed)[-4000:]
    assert not (runs / str(resumed)).exists()  # it finished the killed run's folder
    assert phase_results(run_dir) == phase_results(baseline_run[2])
    report = json.loads((run_dir / "report.json").read_text())
    (attempt,) = report["attempts"]  # the killed attempt never got to write its own
    assert attempt["flower_run_id"] == resumed
    assert {"discover", "source-training"} <= set(attempt["reloaded"])
    assert "source-training" not in attempt["ran"]
    assert sitebridge(["audit", "verify", str(run_dir / "ledger.jsonl")]) == 0


def test_a_supernode_killed_mid_phase_is_left_out_and_reported(
    deployment: LoopbackDeployment, loopback_root: Path
) -> None:
    # Prepare
    runs = loopback_root / "runs-dropout"
    node_id = deployment.node_ids["C"]

    # Execute: SIGKILL C's SuperNode as soon as source training is sent
    run_id = deployment.submit_run(
        tiny_run_config(runs, **{"last-phase": "transferability"})
    )
    ledger = runs / str(run_id) / "ledger.jsonl"
    wait_until(
        lambda: ledger.is_file() and '"train.source"' in ledger.read_text(),
        timeout_s=RUN_TIMEOUT_S,
        what="the coordinator to send train.source",
        poll_s=0.1,
    )
    deployment.stop_supernode("C", signal.SIGKILL)
    status = deployment.wait_for_run(run_id, timeout_s=RUN_TIMEOUT_S)

    # Assert: the phase went on with B and the report says C was missing and why
    assert status == "finished:completed", deployment.run_log(run_id)[-4000:]
    report = json.loads((runs / str(run_id) / "report.json").read_text())
    reason = report["missing"]["source-training"]["C"]
    assert reason.startswith(("error 5:", "no reply within")), reason
    assert report["transferability"]["main"] == "B"
    assert report["transferability"]["aux"] is None
    roles = {site["name"]: site["role"] for site in report["sites"]}
    assert roles == {"A": "target", "B": "source", "C": "failed"}
    assert "- source-training: C:" in (runs / str(run_id) / "report.md").read_text()

    # The restarted SuperNode rejoins under the same node id (bound to its key).
    deployment.start_supernode("C")
    deployment.wait_for_online(["C"], timeout_s=REFUSAL_TIMEOUT_S)
    assert deployment.node_statuses()[node_id] == "online"


def read_from(path: Path, offset: int) -> str:
    with path.open("rb") as file:
        file.seek(offset)
        return file.read().decode(errors="replace")


# Keep this test last: it stops the module's deployment.
def test_every_process_the_harness_started_is_gone_after_close(
    deployment: LoopbackDeployment,
) -> None:
    # Prepare
    processes = deployment.tracked_processes()
    daemons = {deployment.superlink_pid, *map(deployment.supernode_pid, SITES)}
    assert None not in daemons  # all still up
    assert daemons <= {record.pid for record in processes}
    assert "flower-superexec" in " ".join(record.command for record in processes)

    # Execute
    deployment.close()

    # Assert: checked in /proc, PID and start time, one by one (a zombie that PID 1
    # has yet to reap counts as gone: it no longer runs)
    assert [record for record in processes if is_running(record)] == []
    assert deployment.marked_processes() == []
    assert deployment.superlink_pid is None
