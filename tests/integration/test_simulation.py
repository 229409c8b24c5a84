"""The whole TGMA pipeline through a real Flower simulation (`flwr run .`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import protocol
from core.cli import main as sitebridge
from core.data.synthetic import write_federation
from core.privacy.ledger import Ledger
from simulations.simulate import format_run_config, run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.pipeline]

TEMPLATE = (
    Path(__file__).resolve().parents[2] / "deploy" / "policy.template.toml"
).read_text()
# The target releases LFTM per case; everything else is the template's defaults.
TARGET_POLICY = TEMPLATE.replace('lftm = "domain"', 'lftm = "instance"')
# A source that requires DP-SGD for everything done with its labelled data.
DP_SOURCE_POLICY = TEMPLATE.replace("required = false", "required = true").replace(
    "noise-multiplier = 1.0", "noise-multiplier = 1.5"
)


def truncate_first_image(site: Path) -> Path:
    """Cut the site's first training image to half its bytes; return its path."""
    image = sorted((site / "imagesTr").iterdir())[0]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return image


def run_tiny_federation(
    tmp_path: Path,
    num_sites: int = 3,
    broken_site: str | None = None,
    dp_sources: bool = False,
    **overrides: bool | int | float | str,
) -> Path:
    """The one place that starts a simulation: returns the run folder.

    ``broken_site`` gets a truncated image, so as a source it fails in source
    training and the run must go on without it (federation.min-sites is 2). With
    ``dp_sources`` every source's own policy requires DP-SGD.
    """
    federation = tmp_path / "federation"
    names = write_federation(federation, seed=3, num_sites=num_sites, num_train_cases=3)
    (federation / "A" / "policy.toml").write_text(TARGET_POLICY)
    if dp_sources:
        for name in names:
            if name != "A":
                (federation / name / "policy.toml").write_text(DP_SOURCE_POLICY)
    if broken_site is not None:
        truncate_first_image(federation / broken_site)
    runs = tmp_path / "runs"
    run_config = {
        "federation.dir": str(federation),
        "output.runs-dir": str(runs),
        "data.image-size": 32,
        "data.max-slices-per-case": 4,
        "train.epochs": 3,
        "adapt.epochs": 1,
        "consensus.epochs": 1,
        "consensus.refine-epochs": 1,
        "semisup.iterations": 2,
        "semisup.rounds": 2,
        "semisup.local-iterations": 2,
        "semisup.passes": 2,
        "model.channels": "8,16,32",
        "model.strides": "2,2",
        **overrides,
    }
    exit_code = run_simulation(
        num_supernodes=num_sites,
        run_config=format_run_config(run_config),
        flwr_home=tmp_path / "flwr-home",
        timeout_s=600,
    )
    assert exit_code == 0
    run_dirs = [path for path in runs.iterdir() if path.is_dir()]
    assert len(run_dirs) == 1
    return run_dirs[0]


def test_tiny_federation_runs_the_whole_pipeline(tmp_path: Path) -> None:
    # Execute: every source's policy requires DP-SGD; source D's data is broken. The
    # affinity is the paper's two-term form: the budget story below (the path's
    # fine-tuning runs out of budget, the semisup rounds do not) was set for its
    # 3-mechanism profile release; the default polarity term adds a 4th, which tips
    # the sources' federated semisup rounds over their 10-epsilon budget too.
    run_dir = run_tiny_federation(
        tmp_path,
        num_sites=4,
        broken_site="D",
        dp_sources=True,
        **{"affinity.polarity-weight": 0.0, "affinity.label-weight": 0.0875},
    )

    # Assert
    report = json.loads((run_dir / "report.json").read_text())
    roles = {site["name"]: site["role"] for site in report["sites"]}
    assert roles == {"A": "target", "B": "source", "C": "source", "D": "failed"}
    assert all(site["cases"]["labelled"] == 3 for site in report["sites"])
    # Dropout: D is left out, and the report says who and why (naming the file by
    # its place in the site and the case by index, never by path or name).
    broken = sorted((tmp_path / "federation" / "D" / "imagesTr").iterdir())[0]
    reason = report["missing"]["source-training"]["D"]
    assert reason.startswith("error ")
    assert "<site>/imagesTr/case #0: truncated or unreadable image" in reason
    assert str(broken.parent) not in reason
    assert "- source-training: D: error" in (run_dir / "report.md").read_text()
    # SeqTran: every readable site published a profile, the sources' noised under
    # their DP (its epsilon in the reply), the target's exact; the path's first
    # fine-tuning step then ran out of budget at its site, so the run went on
    # without the SeqTran candidate.
    affinity = report["affinity"]
    assert set(affinity["profiles"]) == {"A", "B", "C"}
    for site, release in affinity["profiles"].items():
        assert release["dp.noise-multiplier"] == (0.0 if site == "A" else 1.5)
        assert (release["dp.epsilon-spent"] > 0.0) == (site != "A")
    assert "D" in affinity["missing"]
    assert affinity["path"]["nodes"][-1] == "A"
    assert len(affinity["path"]["nodes"]) == 3
    assert "PrivacyBudgetError" in affinity["stopped"]
    assert affinity["model"] is None
    assert (run_dir / "affinity_path.png").stat().st_size > 0
    assert "## Task affinity and transfer path" in (run_dir / "report.md").read_text()
    transfer = report["transferability"]
    assert set(transfer["dtm"]) == {"B", "C"}
    # No SeqTran candidate: every candidate is label-free, one TGMA choice
    assert transfer["few_label"] is None
    chosen = transfer["label_free"]
    assert {chosen["main"], chosen["aux"]} == {"B", "C"}
    assert chosen["weights"]["main"] + chosen["weights"]["aux"] == pytest.approx(1.0)
    assert chosen["weights"]["main"] >= chosen["weights"]["aux"]
    assert transfer["release"] == "instance"  # A's own policy.toml
    assert len(transfer["itm"]) == 3  # one row per target training case, no names
    dice = report["evaluation"]["dice"]
    assert set(dice) == {"source:B", "source:C", "uniform", "tgma", "tgma-main"} | {
        f"consensus:{method}" for method in protocol.CONSENSUS_METHODS
    } | {"semisup:target", "semisup:federated"}
    assert all(0.0 <= value <= 1.0 for value in dice.values())
    # A's 3 labelled cases trained both UG-MCL students: few-label, the rest not
    groups = report["evaluation"]["groups"]
    assert {name for name, group in groups.items() if group == "few-label"} == {
        "semisup:target",
        "semisup:federated",
    }
    assert set(groups) == set(dice)
    evaluation = (run_dir / "report.md").read_text().split("## Evaluation on ")[1]
    label_free, few_label = evaluation.split(
        "### few-label (used 3 labelled target cases)"
    )
    assert "### label-free" in label_free
    assert "| semisup:" not in label_free
    assert "| semisup:target |" in few_label
    consensus = report["consensus"]
    assert consensus["sources"] == ["B", "C"]
    assert set(consensus["label_dice"]) == set(protocol.CONSENSUS_METHODS)
    assert "## Label consensus at the target" in (run_dir / "report.md").read_text()
    # Semi-supervised rounds ran under DP-SGD at the sources (D failed: broken
    # image), without at the target, whose policy does not require it.
    semisup = report["semisup"]
    assert semisup["target"]["site"] == "A"
    assert semisup["target"]["dp.epsilon-spent"] == 0.0
    federated = semisup["federated"]
    assert federated["sites"] == ["A", "B", "C", "D"]
    assert [entry["round"] for entry in federated["rounds"]] == [0, 1, 2]
    for entry in federated["rounds"][1:]:
        assert set(entry["train"]) == {"A", "B", "C"}
        assert "D" in entry["missing"]
    assert "## Semi-supervised rounds (UG-MCL)" in (run_dir / "report.md").read_text()
    assert (run_dir / "semisup_dice.png").stat().st_size > 0
    # The consensus labels stay at the target, in its state folder.
    target_state = tmp_path / "federation" / "A" / ".sitebridge"
    assert list((target_state / "consensus").glob("run-*/deepstaple/*.nii.gz"))
    for phase in (
        "discover",
        "plan",
        "source-training",
        "affinity",
        "transferability",
        "adaptation",
        "consensus",
        "semisup",
        "evaluation",
    ):
        assert (run_dir / "phases" / f"{phase}.json").exists()
    for model in ("source-B", "source-C", "adapted-main", "adapted-aux"):
        assert (run_dir / "models" / f"{model}.npz").exists()
    assert (run_dir / "report.md").read_text().startswith("# SiteBridge run")
    assert (run_dir / "dtm.png").stat().st_size > 0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train.epochs"] == 3

    # Privacy: DP applied at the sources, every ledger intact, the report says so.
    privacy = report["privacy"]
    assert set(privacy) == {"A", "B", "C", "D"}
    assert privacy["D"]["released"]["train.source"]["errors"] == 1
    for source in ("B", "C"):
        assert privacy[source]["policy"]["policy.dp.required"] is True
        assert privacy[source]["epsilon"]["noise_multiplier"] == 1.5
        # source training and the semisup rounds both spent at the site
        assert (
            privacy[source]["epsilon"]["spent"]
            > (report["source_training"][source]["dp.epsilon-spent"])
        )
        assert privacy[source]["released"]["train.source"]["arrays"] > 0
    assert privacy["A"]["policy"]["policy.release.lftm"] == "instance"
    assert privacy["A"]["policy"]["policy.dp.required"] is False
    assert privacy["A"]["released"]["query.lftm"]["arrays"] == 0
    assert "## Privacy" in (run_dir / "report.md").read_text()
    federation = tmp_path / "federation"
    for ledger in (
        run_dir / "ledger.jsonl",
        *(federation / site / ".sitebridge" / "ledger.jsonl" for site in "ABCD"),
    ):
        assert sitebridge(["audit", "verify", str(ledger)]) == 0
    # Every site's ledger holds every anchor its replies carried to the coordinator.
    for site in "ABCD":
        site_ledger = federation / site / ".sitebridge" / "ledger.jsonl"
        verify = ["audit", "verify", str(site_ledger)]
        assert sitebridge([*verify, "--against", str(run_dir / "ledger.jsonl")]) == 0
    site_digests = {
        entry.egress.digest
        for site in "ABCD"
        for entry in Ledger(
            federation / site / ".sitebridge" / "ledger.jsonl"
        ).entries()
        if entry.egress is not None
    }
    received = [
        entry
        for entry in Ledger(run_dir / "ledger.jsonl").entries()
        if entry.direction == "ingress"
    ]
    # hello, fingerprint (D's error reply too), source (D's error too), profile
    # (D's error too), the refused fine-tuning step, lftm, adapt, consensus, semisup
    # at the target, round 0's evaluations, two rounds of semisup and evaluation at
    # four sites (D's semisup errors too), evaluate
    assert len(received) == 4 + 4 + 3 + 4 + 1 + 1 + 1 + 1 + 1 + 4 + 2 * (4 + 4) + 1
    assert all(
        entry.egress and entry.egress.digest in site_digests for entry in received
    )
    assert (federation / "B" / ".sitebridge" / "accountant.json").is_file()


def test_a_failing_run_exits_non_zero_and_says_why(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Prepare: `flwr run --stream` itself exits 0 when the ServerApp raises.
    federation = tmp_path / "federation"
    write_federation(federation, seed=3, num_sites=3, num_train_cases=2)
    run_config = {
        "federation.dir": str(federation),
        "output.runs-dir": str(tmp_path / "runs"),
        "federation.target-site": "Z",
    }

    # Execute
    exit_code = run_simulation(
        num_supernodes=3,
        run_config=format_run_config(run_config),
        flwr_home=tmp_path / "flwr-home",
        timeout_s=300,
    )

    # Assert
    assert exit_code == 1
    assert "target site 'Z' is not among the sites" in capfd.readouterr().err
