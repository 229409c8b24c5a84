from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.cli import find_report, main
from core.data import index_site


def test_synth_writes_a_federation_in_the_site_layout(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    exit_code = main(["synth", str(tmp_path / "fed"), "--sites", "3", "--cases", "2"])

    # Assert
    assert exit_code == 0
    assert "wrote 3 sites" in capsys.readouterr().out
    assert len(index_site(tmp_path / "fed" / "B").labelled) == 2


def test_builtin_generates_once_and_reuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a small built-in federation keeps the test fast.
    monkeypatch.setattr("core.synthetic.EVALUATION_CASES_PER_SITE", 1)

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


def test_site_check_summarises_a_good_site(
    federation: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    exit_code = main(["site", "check", str(federation / "A")])

    # Assert
    assert exit_code == 0
    assert "A" in capsys.readouterr().out


def test_site_check_names_the_bad_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    main(["synth", str(tmp_path / "fed"), "--sites", "3", "--cases", "2"])
    broken = tmp_path / "fed" / "A" / "imagesTr" / "a_001_0000.nii.gz"
    broken.write_bytes(b"not an image")
    capsys.readouterr()

    # Execute
    exit_code = main(["site", "check", str(tmp_path / "fed" / "A")])

    # Assert
    assert exit_code == 1
    error = capsys.readouterr().err
    assert "a_001_0000.nii.gz" in error
    assert "unreadable" in error


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
