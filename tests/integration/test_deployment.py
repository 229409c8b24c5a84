"""The pipeline over a real gRPC + TLS deployment with SuperNode auth, on loopback.

One harness (deploy/loopback.py) serves the whole module: a SuperLink and three sites
started by the deploy/ scripts, each a SuperNode in ``--isolation process`` and the
site's own app process (``sitebridge-serve``); the harness approves this repository's
app bundle at every site, as a site's IT would. The tests: an uninterrupted run (also
the baseline), a bundle whose guard was removed (refused by every site, ledgered), a
key that is not registered, a wrong CA or an unreachable coordinator (start-supernode.sh
says which and fails), a node without TLS, a fourth registered node whose folder is
named like a site (it never becomes that site), a ServerApp killed mid-run and resumed
with ``resume-run``, a SuperNode killed mid-phase (dropout), and at the end, that every
process the harness started is gone. Every wait is on an event (a file, a run status,
a process exit, a log line) with a generous deadline, never a fixed sleep. The last test
stops the harness: keep it last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from clients.serve import BUNDLE_NOT_APPROVED
from core.cli import main as sitebridge
from core.data.synthetic import write_federation
from core.logs import configure_logging
from core.privacy.approvals import refused_bundle_path
from core.privacy.ledger import Ledger
from deploy.loopback import (
    REPO_ROOT,
    LoopbackDeployment,
    SiteNode,
    is_running,
    wait_until,
)
from simulations.simulate import free_port

pytestmark = [pytest.mark.integration, pytest.mark.pipeline]

SITES = ("A", "B", "C")
RUN_TIMEOUT_S = 900.0
REFUSAL_TIMEOUT_S = 180.0
RESUME_LAST_PHASE = {"last-phase": "adaptation"}
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
    configure_logging()  # the harness's lines, as it goes (-s)
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
    """The three sites' SuperNodes are online, and no other node is registered."""
    deployment.wait_for_online(SITES, timeout_s=REFUSAL_TIMEOUT_S)
    registered = {
        node
        for node, status in deployment.node_statuses().items()
        if status != "unregistered"
    }
    assert registered == {deployment.node_ids[site] for site in SITES}


def site_state_dirs(deployment: LoopbackDeployment) -> dict[str, Path]:
    return {site: deployment.site_state_dir(site) for site in SITES}


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
        "plan",
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


def test_the_sites_ran_the_installed_sitebridge_not_the_bundle(
    deployment: LoopbackDeployment, baseline_run: tuple[int, str, Path]
) -> None:
    # Prepare / Execute: the baseline run
    run_id, status, _ = baseline_run
    assert status == "finished:completed"

    # Assert: no SuperNode unpacked the bundle (Flower's subprocess isolation would
    # install it under its FLWR_HOME); each site's app process answered the run
    for site in SITES:
        home = deployment.root / "state" / f"supernode-{site}-home"
        assert not (home / "apps").exists(), sorted(home.rglob("*"))[:5]
        app_log = deployment.app_log(site).read_text()
        assert f"run {run_id}: query.hello for site {site} (bundle " in app_log
        assert f"{deployment.approved_bundle[:12]} approved)" in app_log  # type: ignore[index]


def copy_repository(destination: Path) -> Path:
    """This repository's files as ``flwr run .`` would bundle them, in a new folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    return destination


def test_a_bundle_whose_guard_was_removed_gets_nothing_from_any_site(
    deployment: LoopbackDeployment, loopback_root: Path
) -> None:
    # Prepare: the coordinator edits clients/guard.py in its copy before flwr run
    app = copy_repository(loopback_root / "rogue-app" / "sitebridge")
    with (app / "clients" / "guard.py").open("a") as guard:
        guard.write(
            "\n\ndef egress_guard(message, context, call_next):  # no guard\n"
            "    return call_next(message, context)\n"
        )
    rogue = deployment.bundle_sha256(app)
    assert rogue != deployment.approved_bundle
    runs = loopback_root / "runs-rogue"

    # Execute
    run_id = deployment.submit_run(tiny_run_config(runs), app_dir=app)
    status = deployment.wait_for_run(run_id, timeout_s=RUN_TIMEOUT_S)

    # Assert: every site refused, so the run ended at discover without results
    assert status == "finished:failed", deployment.run_log(run_id)[-4000:]
    report = json.loads((runs / str(run_id) / "report.json").read_text())
    assert "discover: only 0 site(s) answered" in report["error"]
    assert report["error"].count(f"bundle SHA-256 {rogue} is not approved") == 3
    assert (
        f"sitebridge site approve --state-dir <state-dir> {rogue}" in (report["error"])
    )
    assert not (runs / str(run_id) / "phases" / "discover.json").exists()
    assert not list((runs / str(run_id)).glob("models/*"))
    # Each site ledgered its refusal and kept the bundle for review.
    for site, state in site_state_dirs(deployment).items():
        entries = [
            entry
            for entry in Ledger(state / "ledger.jsonl").entries()
            if entry.run_id == str(run_id)
        ]
        assert [entry.decision for entry in entries] == [
            f"blocked: {BUNDLE_NOT_APPROVED}"
        ], site
        assert entries[0].message_type == "query.hello"
        assert refused_bundle_path(state, rogue).is_file()
        assert sitebridge(["audit", "verify", str(state / "ledger.jsonl")]) == 0


@pytest.mark.parametrize(
    ("extra_env", "says"),
    [
        pytest.param(
            {},
            "the coordinator refused this SuperNode: its key is not registered or "
            "was revoked. Send keys/rogue.pub to the coordinator",
            id="unregistered-key",
        ),
        pytest.param(
            {"SITEBRIDGE_CA_CERT": "other-ca.crt"},
            "TLS to the coordinator failed: its certificate is not signed by",
            id="wrong-ca",
        ),
        pytest.param(
            {"SUPERLINK_FLEET_ADDRESS": "127.0.0.1:closed"},
            "the coordinator is unreachable: nothing answered at 127.0.0.1:",
            id="unreachable",
        ),
    ],
)
def test_start_supernode_says_why_the_coordinator_did_not_accept_the_node(
    deployment: LoopbackDeployment,
    deployed_federation: Path,
    loopback_root: Path,
    extra_env: dict[str, str],
    says: str,
) -> None:
    # Prepare: a key made by make-site-key.sh but never registered, and the case's
    # misconfiguration (another CA's certificate; a port nothing listens on)
    env = dict(extra_env)
    if "SITEBRIDGE_CA_CERT" in env:
        env["SITEBRIDGE_CA_CERT"] = str(other_ca(loopback_root))
    if env.get("SUPERLINK_FLEET_ADDRESS", "").endswith(":closed"):
        env["SUPERLINK_FLEET_ADDRESS"] = f"127.0.0.1:{free_port()}"
    superlink_log_start = deployment.superlink_log.stat().st_size
    # A refusal or a TLS failure is answered as soon as it is seen: the wait only
    # bounds a loaded machine. Where nothing answers, the wait itself is the outcome.
    unreachable = "SUPERLINK_FLEET_ADDRESS" in env
    timeout_s = 8 if unreachable else 180

    # Execute
    completed = deployment.try_start_supernode(
        "rogue", site_dir=deployed_federation / "A", extra_env=env, timeout_s=timeout_s
    )

    # Assert: a non-zero exit with the reason, and nothing of the node left running
    assert completed.returncode == 1, completed.stderr
    assert says in completed.stderr
    assert deployment.supernode_pid("rogue") is None
    assert deployment.app_pid("rogue") is None
    if not extra_env:
        assert "[code: 2004] Failed to activate SuperNode" in completed.stderr
        superlink_log = deployment.superlink_log
        wait_until(
            lambda: (
                "No SuperNode found with the given public key"
                in read_from(superlink_log, superlink_log_start)
            ),
            timeout_s=60,
            what="the SuperLink to log the unknown key",
        )
    only_registered_nodes_online(deployment)


def test_register_site_refuses_a_second_key_under_a_taken_name(
    deployment: LoopbackDeployment,
) -> None:
    # Prepare: a new key, sent to the coordinator as if it were site A's
    deployment.run_script("make-site-key.sh", "second-a")
    before = deployment.node_statuses()

    # Execute
    completed = deployment.run_script(
        "register-site.sh", str(deployment.root / "keys" / "second-a.pub"), "A"
    )

    # Assert: refused, naming A's node; nothing was registered
    assert completed.returncode == 1
    assert (
        f"a key is already registered as 'A' (node {deployment.node_ids['A']})"
        in completed.stderr
    )
    assert deployment.node_statuses() == before


def other_ca(root: Path) -> Path:
    """A self-signed CA certificate that signed nothing of this deployment."""
    certificate = root / "other-ca.crt"
    if not certificate.exists():
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes"),
                *("-keyout", str(root / "other-ca.key"), "-out", str(certificate)),
                *("-subj", "/CN=another CA", "-days", "1"),
            ],
            check=True,
            capture_output=True,
        )
    return certificate


def test_a_supernode_without_tls_is_refused(
    deployment: LoopbackDeployment, deployed_federation: Path
) -> None:
    # Execute: --insecure and no key, against the TLS Fleet port: the TLS server
    # closes the plain-text connection. (The SuperLink's gRPC core logs the failed
    # handshake, WRONG_VERSION_NUMBER, only sometimes: not asserted.)
    node = deployment.start_insecure_supernode(
        "plaintext", site_dir=deployed_federation / "A"
    )
    exit_code = node.wait(timeout_s=REFUSAL_TIMEOUT_S)

    # Assert: Flower logs its own exit code 305; the process exits with status 1.
    log = node.log_text()
    assert exit_code != 0, log
    assert "Exit Code: 305" in log
    assert "failed to connect to all addresses" in log
    only_registered_nodes_online(deployment)


FOUR_SITES_DISCOVER: dict[str, bool | int | float | str] = {
    "federation.expected-sites": 4,
    "last-phase": "discover",
}


def test_a_fourth_node_whose_folder_is_named_like_a_site_does_not_become_it(
    deployment: LoopbackDeployment, deployed_federation: Path, loopback_root: Path
) -> None:
    # Prepare: a fourth key, registered as D, whose site folder is named A
    poser = loopback_root / "poser" / "A"
    shutil.copytree(deployed_federation / "B", poser)
    node_d = deployment.add_site(
        SiteNode(name="D", site_dir=poser, state_dir=loopback_root / "site-state" / "D")
    )
    runs = loopback_root / "runs-poser"
    try:
        # Execute: a run that expects four sites, and one that expects three
        four = deployment.submit_run(tiny_run_config(runs, **FOUR_SITES_DISCOVER))
        four_status = deployment.wait_for_run(four, timeout_s=RUN_TIMEOUT_S)
        three = deployment.submit_run(
            tiny_run_config(runs, **{"last-phase": "discover"})
        )
        three_status = deployment.wait_for_run(three, timeout_s=RUN_TIMEOUT_S)
    finally:
        deployment.remove_site("D")

    # Assert: with four expected, the node takes part as D (its registered name),
    # never as A, and the coordinator's log says what it claimed
    assert four_status == "finished:completed", deployment.run_log(four)[-4000:]
    discover = json.loads((runs / str(four) / "phases" / "discover.json").read_text())
    names = {site["name"]: site["node_id"] for site in discover["sites"]}
    assert names == {**{s: deployment.node_ids[s] for s in SITES}, "D": node_d}
    assert (
        f"node {node_d} says it is site 'A', but its key is registered as 'D'"
    ) in deployment.run_log(four)
    # With three expected, discover refuses, naming every node and its name.
    assert three_status == "finished:failed", deployment.run_log(three)[-4000:]
    error = json.loads((runs / str(three) / "report.json").read_text())["error"]
    assert error.startswith("discover: 4 nodes are connected, 3 expected")
    assert f"{node_d} ('D')" in error
    assert f"{deployment.node_ids['A']} ('A')" in error
    only_registered_nodes_online(deployment)


def test_a_killed_serverapp_resumes_to_the_uninterrupted_results(
    deployment: LoopbackDeployment,
    baseline_run: tuple[int, str, Path],
    loopback_root: Path,
) -> None:
    # Prepare: a run whose ServerApp process is killed once source training is saved.
    # It stops after adaptation: the baseline is the deployment's one full pipeline,
    # and what a resume does in each later phase is tests/unit/server/test_runner.py's.
    runs = loopback_root / "runs-resume"
    killed = deployment.submit_run(tiny_run_config(runs, **RESUME_LAST_PHASE))
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
    # the ServerApp's heartbeat expired, about a minute later (see
    # docs/deployment.md#flower-139-behaviours-the-scripts-rely-on). Do not
    # resume before it has finished: with both runs open, the SuperLink's SQLite state
    # was locked, its ServerApp launcher died on the error and no later run started.
    deployment.stop_run(killed)
    stopped = deployment.wait_for_run(killed, timeout_s=RUN_TIMEOUT_S)
    assert stopped == "finished:stopped"
    assert not (run_dir / "phases" / "evaluation.json").exists()

    # Execute: a new run resumes the killed one (run ids exceed TOML's int64: quoted)
    resumed = deployment.submit_run(
        tiny_run_config(runs, **RESUME_LAST_PHASE, **{"resume-run": str(killed)})
    )
    status = deployment.wait_for_run(resumed, timeout_s=RUN_TIMEOUT_S)

    # Assert: finished phases reloaded, the rest run, results as if never killed
    assert status == "finished:completed", deployment.run_log(resumed)[-4000:]
    assert not (runs / str(resumed)).exists()  # it finished the killed run's folder
    resumed_phases = phase_results(run_dir)
    assert set(resumed_phases) == {
        "discover",
        "plan",
        "source-training",
        "transferability",
        "adaptation",
    }
    baseline = phase_results(baseline_run[2])
    assert resumed_phases == {phase: baseline[phase] for phase in resumed_phases}
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
    assert report["transferability"]["label_free"]["main"] == "B"
    assert report["transferability"]["label_free"]["aux"] is None
    assert report["transferability"]["few_label"] is None
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
