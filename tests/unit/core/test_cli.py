from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.cli import find_report, main
from core.config import SyntheticScale, load_default_config
from core.data.dataset import index_site
from tests.unit.bad_input import (
    BAD_SITES,
    SITE,
    TRAIN_LABEL,
    BadSite,
    copy_site,
    rewrite,
    with_voxels,
)

POLICY_TEMPLATE = (
    Path(__file__).resolve().parents[3] / "deploy" / "policy.template.toml"
)


def test_synth_writes_a_federation_in_the_site_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    exit_code = main(["synth", str(tmp_path / "fed"), "--sites", "3", "--cases", "2"])

    # Assert
    assert exit_code == 0
    assert "wrote 3 sites" in capsys.readouterr().out
    assert len(index_site(tmp_path / "fed" / "B").labelled) == 2


def test_synth_writes_a_mild_shift_federation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr("core.data.synthetic.EVALUATION_CASES_PER_SITE", 1)
    fed = tmp_path / "fed"

    # Execute
    exit_code = main(
        ["synth", str(fed), "--sites", "3", "--cases", "1", "--shift", "mild"]
    )

    # Assert
    assert exit_code == 0
    assert 'shift = "mild"' in (fed / "federation.toml").read_text()


def test_synth_passes_the_hospital_scale_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: record the call (a hospital-scale federation takes seconds to write)
    calls: list[dict[str, object]] = []

    def record(out: Path, **kwargs: object) -> tuple[str, ...]:
        calls.append(kwargs)
        return ("A", "B", "C")

    monkeypatch.setattr("core.data.synthetic.write_federation", record)

    # Execute
    exit_code = main(["synth", str(tmp_path / "fed"), "--scale", "hospital"])

    # Assert
    assert exit_code == 0
    assert calls[0]["scale"] is SyntheticScale.HOSPITAL


def test_builtin_generates_once_and_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a small built-in federation keeps the test fast.
    monkeypatch.setattr("core.data.synthetic.EVALUATION_CASES_PER_SITE", 1)

    # Execute
    first = main(["builtin", "--cache-dir", str(tmp_path)])
    first_output = capsys.readouterr().out
    second = main(["builtin", "--cache-dir", str(tmp_path)])
    second_output = capsys.readouterr().out

    # Assert
    assert first == second == 0
    assert "generating the built-in synthetic federation" in first_output
    assert "generating" not in second_output
    assert "built-in federation:" in second_output
    # The demo's federation: a few-label target (pyproject's default count)
    defaults = load_default_config().federation
    labelled = defaults.synthetic_target_labelled
    (folder,) = tmp_path.iterdir()
    assert folder.name.endswith(f"-target{labelled}")
    assert str(folder) in second_output
    assert len(index_site(folder / "A").labelled) == labelled
    assert len(index_site(folder / "A").training_images) == defaults.synthetic_cases
    assert len(index_site(folder / "B").labelled) == defaults.synthetic_cases


def test_progress_is_logged_and_log_level_quiets_it_not_the_result(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare
    monkeypatch.setattr("core.data.synthetic.EVALUATION_CASES_PER_SITE", 1)
    fed = str(tmp_path / "fed")

    # Execute
    quiet = main(["synth", fed, "--sites", "3", "--cases", "1", "--log-level", "error"])
    quiet_output = capsys.readouterr().out
    shown = main(["synth", fed + "2", "--sites", "3", "--cases", "1"])
    shown_output = capsys.readouterr().out

    # Assert: the result always; the progress lines only at info, as log lines
    assert quiet == shown == 0
    assert quiet_output.splitlines() == [f"wrote 3 sites to {fed} (default target A)"]
    assert " INFO sitebridge.data: " in shown_output
    assert shown_output.endswith(f"wrote 3 sites to {fed}2 (default target A)\n")


def test_site_check_summarises_a_good_site(
    federation: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a site with its own (valid) policy
    site = copy_site(federation, tmp_path / SITE)
    (site / "policy.toml").write_text(
        POLICY_TEMPLATE.read_text(encoding="utf-8"), encoding="utf-8"
    )

    # Execute
    exit_code = main(["site", "check", str(site)])

    # Assert
    assert exit_code == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert lines[:5] == [
        "site B (synthetic-MR)",
        "  cases: 2 labelled, 0 unlabelled, 6 evaluation",
        "  classes (dataset.json): 0 background, 1 organ; labels checked against 0..1",
        "  image shapes (z, y, x): 10x64x64",
        "  spacing (x, y, z) mm: 1.5-1.5, 1.5-1.5, 3-3",
    ]
    assert lines[5].startswith("  intensity range: ")
    assert lines[6].startswith("  label voxels per class: 0: ")
    assert lines[7].startswith("  foreground fraction: ")
    assert lines[8] == f"  policy: {site / 'policy.toml'}"
    assert "LFTM release: domain; weights may leave: yes" in lines[10]
    assert lines[-1] == f"OK: {site} passes the checks its SuperNode applies"


@pytest.mark.parametrize(("name", "bad"), BAD_SITES.items(), ids=list(BAD_SITES))
def test_site_check_names_the_file_and_the_problem(
    federation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    bad: BadSite,
) -> None:
    # Prepare
    site = copy_site(federation, tmp_path / SITE)
    named = bad.damage(site)

    # Execute
    exit_code = main(["site", "check", str(site)])

    # Assert: the same messages the site's error replies carry (test_bad_input.py)
    assert exit_code == 1
    captured = capsys.readouterr()
    (error,) = captured.err.splitlines()
    assert error.startswith(f"error: {named}: ") or error.startswith(
        "error: geometry mismatch between image "
    ), error
    for fragment in (str(named), *bad.problem):
        assert fragment in error, error
    assert "OK:" not in captured.out


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "the node config's 'policy' names no readable file"),
        (
            POLICY_TEMPLATE.read_text(encoding="utf-8").replace(
                "required = false", "required = 'yes'"
            ),
            "dp.required must be true or false, got 'yes'",
        ),
        ("[actions]\nanswer = ['query.hello']\n", "release.lftm is missing"),
    ],
    ids=["missing-file", "bad-value", "missing-key"],
)
def test_site_check_validates_the_policy_the_node_is_started_with(
    federation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str | None,
    fragment: str,
) -> None:
    # Prepare
    site = copy_site(federation, tmp_path / SITE)
    policy = tmp_path / "node-policy.toml"
    if text is not None:
        policy.write_text(text, encoding="utf-8")

    # Execute
    exit_code = main(["site", "check", str(site), "--policy", str(policy)])

    # Assert: the data passed and is summarised; the policy is the one problem
    assert exit_code == 1
    captured = capsys.readouterr()
    assert captured.err == f"error: {policy}: {fragment}\n"
    assert captured.out.startswith("site B (synthetic-MR)\n")


@pytest.mark.parametrize(
    "arguments",
    [["--num-classes", "3"], ["--run-config", "data.num-classes=3"]],
    ids=["num-classes", "run-config"],
)
def test_site_check_checks_labels_against_the_run_configs_classes(
    federation: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
) -> None:
    # Prepare: a label of class 2, outside the default 2 classes
    site = copy_site(federation, tmp_path / SITE)
    rewrite(TRAIN_LABEL, with_voxels(2))(site)

    # Execute
    default_exit = main(["site", "check", str(site)])
    default_error = capsys.readouterr().err
    exit_code = main(["site", "check", str(site), *arguments])

    # Assert
    assert default_exit == 1
    assert "labels outside the declared classes 0..1: found [2]" in default_error
    assert exit_code == 0
    assert "labels checked against 0..2" in capsys.readouterr().out


def test_report_prints_the_newest_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    for run, text, modified in (("1", "# newest", 2_000), ("2", "# older", 1_000)):
        (tmp_path / run).mkdir()
        (tmp_path / run / "report.md").write_text(text)
        os.utime(tmp_path / run / "report.md", (modified, modified))

    # Execute
    exit_code = main(["report", str(tmp_path)])

    # Assert
    assert exit_code == 0
    assert find_report(tmp_path) == tmp_path / "1" / "report.md"
    output = capsys.readouterr().out
    assert "# newest" in output
    assert "# older" not in output


def test_report_without_runs_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    exit_code = main(["report", str(tmp_path)])

    # Assert
    assert exit_code == 1
    assert "no report.md here or in any run folder" in capsys.readouterr().err


def write_audit_ledger(path: Path) -> None:
    from core.privacy.ledger import Egress, Ledger

    ledger = Ledger(path)
    for index, (run_id, message_type, decision, total_bytes) in enumerate(
        (
            ("run-1", "train.source", "released", 200),
            ("run-1", "query.lftm", "blocked: image-shaped array", 4096),
            ("run-2", "evaluate", "released", 24),
        )
    ):
        ledger.append(
            run_id=run_id,
            message_type=message_type,
            sender="A",
            direction="egress",
            egress=Egress(
                arrays=(),
                metrics={"dice": 1},
                configs={},
                total_bytes=total_bytes,
                digest="ab" * 32,
            ),
            decision=decision,
            policy={"max-reply-bytes": 1_000_000},
            epsilon_spent=0.5,
            epsilon_total=0.5 * (index + 1),
            time=f"2025-01-01T00:00:0{index}+00:00",
        )


def test_audit_verify_accepts_an_intact_ledger(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    write_audit_ledger(tmp_path / "ledger.jsonl")

    # Execute
    exit_code = main(["audit", "verify", str(tmp_path / "ledger.jsonl")])

    # Assert
    assert exit_code == 0
    assert capsys.readouterr().out == "OK: 3 entries, chain intact\n"


@pytest.mark.parametrize(
    ("keep", "expected"),
    [
        pytest.param(
            [0, 2], "TAMPERED: entry at line 2 (index 1): out of sequence", id="delete"
        ),
        pytest.param(
            [1, 0, 2], "TAMPERED: entry at line 1 (index 0): out of sequence", id="swap"
        ),
    ],
)
def test_audit_verify_names_the_first_bad_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    keep: list[int],
    expected: str,
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_audit_ledger(path)
    lines = path.read_text().splitlines()
    path.write_text("".join(f"{lines[index]}\n" for index in keep))

    # Execute
    exit_code = main(["audit", "verify", str(path)])

    # Assert
    assert exit_code == 1
    assert capsys.readouterr().err.startswith(expected)


def test_audit_verify_names_an_edited_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_audit_ledger(path)
    path.write_text(path.read_text().replace('"total_bytes":4096', '"total_bytes":1'))

    # Execute
    exit_code = main(["audit", "verify", str(path)])

    # Assert
    assert exit_code == 1
    assert capsys.readouterr().err == (
        "TAMPERED: entry at line 2 (index 1): edited: entry_hash does not match "
        "the entry's content\n"
    )


@pytest.mark.parametrize("action", ["verify", "report"])
def test_audit_on_a_missing_ledger_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    # Execute
    exit_code = main(["audit", action, str(tmp_path / "missing.jsonl")])

    # Assert
    assert exit_code == 2
    assert capsys.readouterr().err == (
        f"error: no ledger at {tmp_path / 'missing.jsonl'}\n"
    )


def test_audit_report_prints_totals_and_writes_html(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    write_audit_ledger(tmp_path / "ledger.jsonl")
    page = tmp_path / "out" / "ledger.html"

    # Execute
    exit_code = main(
        [
            "audit",
            "report",
            str(tmp_path / "ledger.jsonl"),
            "--html",
            str(page),
            "--budget",
            "8",
        ]
    )

    # Assert
    assert exit_code == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    # run, type, direction, replies, released, blocked, errors, undelivered, bytes,
    # arrays, metric values
    for expected in (
        ["run-1", "train.source", "egress", "1", "1", "0", "0", "0", "200", "0", "1"],
        ["run-1", "query.lftm", "egress", "1", "0", "1", "0", "0", "0", "0", "0"],
        ["run-1", "(all)", "(all)", "2", "1", "1", "0", "0", "200", "0", "1"],
        ["(all)", "evaluate", "(all)", "1", "1", "0", "0", "0", "24", "0", "1"],
        ["(all)", "(all)", "(all)", "3", "2", "1", "0", "0", "224", "0", "2"],
    ):
        assert expected in rows
    assert ["epsilon", "budget:", "8,", "remaining:", "6.5"] in rows
    assert ["wrote", str(page)] in rows
    assert "<td>query.lftm</td>" in page.read_text()


def test_audit_report_refuses_a_broken_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    path = tmp_path / "ledger.jsonl"
    write_audit_ledger(path)
    lines = path.read_text().splitlines()
    path.write_text(f"{lines[0]}\n{lines[2]}\n")

    # Execute
    exit_code = main(["audit", "report", str(path), "--html", str(tmp_path / "x.html")])

    # Assert
    assert exit_code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(
        "error: not reporting on a broken chain: entry at line 2 (index 1): "
        "out of sequence"
    )
    assert not (tmp_path / "x.html").exists()
