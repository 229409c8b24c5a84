"""The scale benchmark's pure helpers (no Flower run: that is the benchmark itself)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core import protocol
from core.privacy.ledger import EGRESS, INGRESS, Egress, LedgerEntry
from simulations.benchmark.cli import main
from simulations.benchmark.scale import SCALE_RUN_CONFIG, parse_site_counts
from simulations.benchmark.scale_summary import (
    SCALE_MARKER,
    SCALE_PHASES,
    build_scale_entry,
    count_phase_messages,
    fit_line,
    fit_scale_growth,
    format_scale_table,
    list_failed_site_counts,
    summarise_repeats,
)


def ledger_entry(message_type: str, direction: str, total_bytes: int) -> LedgerEntry:
    return LedgerEntry(
        index=0,
        time="2026-01-01T00:00:00+00:00",
        run_id="1",
        message_type=message_type,
        sender="coordinator",
        direction=direction,
        egress=Egress(
            arrays=(), metrics={}, configs={}, total_bytes=total_bytes, digest="0" * 64
        ),
        decision="released",
        policy={},
        epsilon_spent=0.0,
        epsilon_total=0.0,
        previous_hash="0" * 64,
        entry_hash="0" * 64,
    )


def scale_entry(sites: int, *, per_site: float, memory_mb: float) -> dict[str, object]:
    """An entry whose phases cost ``per_site`` s per site (1x, 2x, 3x by phase)."""
    report = {
        "run_id": 7,
        "error": None,
        "phase_seconds": {
            phase: (index + 1) * per_site * sites
            for index, phase in enumerate(SCALE_PHASES)
        },
        "coordinator": {
            "peak_rss_mb": memory_mb,
            "peak_rss_mb_after_phase": {"discover": memory_mb},
        },
        "source_training": {f"S{index}": {} for index in range(sites - 1)},
    }
    messages = {
        "discover": {
            "requests": sites,
            "replies": sites,
            "bytes_sent": 0,
            "bytes_received": 400 * sites,
        },
        "source-training": {
            "requests": sites - 1,
            "replies": sites - 1,
            "bytes_sent": 0,
            "bytes_received": 0,
        },
        "transferability": {
            "requests": 1,
            "replies": 1,
            "bytes_sent": 50_000 * (sites - 1),
            "bytes_received": 0,
        },
    }
    return build_scale_entry(report, messages=messages, flwr_run_seconds=10.0 * sites)


def scale_document(*counts: int) -> dict[str, object]:
    sites = {
        str(count): summarise_repeats(
            [scale_entry(count, per_site=0.5, memory_mb=700.0 + 2.0 * count)]
        )
        for count in counts
    }
    return {
        "machine": "test machine",
        "seconds": 123.0,
        "settings": {
            "training_cases_per_site": 2,
            "run_config": dict(SCALE_RUN_CONFIG),
            "flwr": "1.39.0",
            "repeats": 1,
        },
        "sites": sites,
        "growth": fit_scale_growth(sites),
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4,8,16,32", [4, 8, 16, 32]), ("32, 4,4", [4, 32]), ("3", [3])],
)
def test_parse_site_counts(text: str, expected: list[int]) -> None:
    # Execute / Assert
    assert parse_site_counts(text) == expected


@pytest.mark.parametrize("text", ["", "2,4", "0"])
def test_parse_site_counts_refuses_fewer_than_three_sites(text: str) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="at least 3"):
        parse_site_counts(text)


def test_count_phase_messages_groups_the_ledger_by_phase_and_direction() -> None:
    # Prepare: 3 sites say hello, 2 sources train, 1 target scores.
    entries = [
        *(ledger_entry(protocol.HELLO, EGRESS, 0) for _ in range(3)),
        *(ledger_entry(protocol.HELLO, INGRESS, 400) for _ in range(3)),
        *(ledger_entry(protocol.TRAIN_SOURCE, EGRESS, 1000) for _ in range(2)),
        *(ledger_entry(protocol.TRAIN_SOURCE, INGRESS, 5000) for _ in range(2)),
        ledger_entry(protocol.LFTM, EGRESS, 2000),
        ledger_entry(protocol.LFTM, INGRESS, 300),
        ledger_entry("custom.action", EGRESS, 1),
    ]

    # Execute
    counts = count_phase_messages(entries)

    # Assert
    assert counts == {
        "discover": {
            "requests": 3,
            "replies": 3,
            "bytes_sent": 0,
            "bytes_received": 1200,
        },
        "source-training": {
            "requests": 2,
            "replies": 2,
            "bytes_sent": 2000,
            "bytes_received": 10000,
        },
        "transferability": {
            "requests": 1,
            "replies": 1,
            "bytes_sent": 2000,
            "bytes_received": 300,
        },
        "custom.action": {
            "requests": 1,
            "replies": 0,
            "bytes_sent": 1,
            "bytes_received": 0,
        },
    }


def test_build_scale_entry_has_the_asked_shape() -> None:
    # Execute
    entry = scale_entry(4, per_site=0.5, memory_mb=700.0)

    # Assert
    assert entry["seconds"] == {
        "discover": 2.0,
        "source-training": 4.0,
        "transferability": 6.0,
    }
    assert entry["peak_rss_mb"] == 700.0
    assert entry["source_models"] == 3
    assert entry["flwr_run_seconds"] == 40.0
    assert entry["error"] is None


def test_build_scale_entry_keeps_only_the_phases_that_ran() -> None:
    # Prepare: a report of a run that stopped after discover
    report = {
        "run_id": 1,
        "error": "too few sites",
        "phase_seconds": {"discover": 3.0},
        "coordinator": {"peak_rss_mb": 500.0, "peak_rss_mb_after_phase": {}},
        "source_training": {},
    }

    # Execute
    entry = build_scale_entry(report, messages={}, flwr_run_seconds=9.0)

    # Assert
    assert entry["seconds"] == {"discover": 3.0}
    assert entry["source_models"] == 0
    assert entry["error"] == "too few sites"


@pytest.mark.parametrize(
    ("xs", "ys", "expected"),
    [
        ([4, 8, 16, 32], [2.0, 4.0, 8.0, 16.0], (0.5, 0.0, 1.0)),
        ([4, 8], [10.0, 10.0], (0.0, 10.0, 1.0)),
    ],
)
def test_fit_line(
    xs: list[int], ys: list[float], expected: tuple[float, float, float]
) -> None:
    # Execute
    fit = fit_line(xs, ys)

    # Assert
    assert fit is not None
    assert (fit["slope"], fit["intercept"], fit["r2"]) == pytest.approx(expected)


def test_fit_line_needs_two_distinct_site_counts() -> None:
    # Execute / Assert
    assert fit_line([4, 4], [1.0, 2.0]) is None


def test_fit_scale_growth_gives_seconds_and_memory_per_added_site() -> None:
    # Execute
    growth = scale_document(4, 8, 16, 32)["growth"]

    # Assert
    assert isinstance(growth, dict)
    for index, phase in enumerate(SCALE_PHASES):
        assert growth[phase]["slope"] == pytest.approx(0.5 * (index + 1))
    assert growth["flwr_run"]["slope"] == pytest.approx(10.0)
    assert growth["peak_rss_mb"]["slope"] == pytest.approx(2.0)
    assert growth["peak_rss_mb"]["intercept"] == pytest.approx(700.0)


def test_fit_scale_growth_leaves_out_failed_runs() -> None:
    # Prepare
    sites = {
        "4": scale_entry(4, per_site=0.5, memory_mb=700.0),
        "8": scale_entry(8, per_site=0.5, memory_mb=700.0),
        "16": {"error": "flwr run exited with 1", "flwr_run_seconds": 5.0},
    }

    # Execute
    growth = fit_scale_growth(sites)

    # Assert
    assert growth["discover"] is not None
    assert growth["discover"]["slope"] == pytest.approx(0.5)


def test_fit_scale_growth_of_a_single_site_count_is_none() -> None:
    # Execute
    growth = fit_scale_growth({"4": scale_entry(4, per_site=1.0, memory_mb=1.0)})

    # Assert
    assert all(fit is None for fit in growth.values())


def test_summarise_repeats_takes_median_times_and_the_largest_memory() -> None:
    # Prepare: three runs at 4 sites, the second slowed down by other work
    runs = [
        scale_entry(4, per_site=per_site, memory_mb=memory)
        for per_site, memory in ((0.5, 700.0), (5.0, 702.0), (0.6, 701.0))
    ]
    for run, load in zip(runs, ([1.0, 2.0], [6.0, 7.5], [2.0, 2.5]), strict=True):
        run["load_average_1min"] = load

    # Execute
    summary = summarise_repeats(runs)

    # Assert
    assert summary["seconds"] == pytest.approx(
        {"discover": 2.4, "source-training": 4.8, "transferability": 7.2}
    )
    assert summary["flwr_run_seconds"] == 40.0
    assert summary["peak_rss_mb"] == 702.0
    assert summary["peak_rss_mb_after_phase"] == {"discover": 702.0}
    assert summary["load_average_1min"] == [1.0, 7.5]
    assert summary["source_models"] == 3
    assert summary["failed_repeats"] == 0
    assert summary["error"] is None
    assert len(summary["repeats"]) == 3


def test_summarise_repeats_leaves_out_a_failed_run() -> None:
    # Prepare
    runs = [
        {"error": "flwr run exited with 1", "flwr_run_seconds": 3.0},
        scale_entry(4, per_site=0.5, memory_mb=700.0),
    ]

    # Execute
    summary = summarise_repeats(runs)

    # Assert
    assert summary["seconds"]["discover"] == pytest.approx(2.0)
    assert summary["failed_repeats"] == 1
    assert summary["error"] is None


def test_summarise_repeats_of_only_failed_runs_is_an_error() -> None:
    # Prepare
    runs = [{"error": "flwr run exited with 124", "flwr_run_seconds": 9.0}]

    # Execute
    summary = summarise_repeats(runs)

    # Assert
    assert summary["error"] == "flwr run exited with 124"
    assert list_failed_site_counts({"sites": {"32": summary}}) == ["32"]


def test_list_failed_site_counts() -> None:
    # Prepare
    document = scale_document(4)
    document["sites"]["8"] = {"error": "timeout", "flwr_run_seconds": 1.0}  # type: ignore[index]

    # Execute / Assert
    assert list_failed_site_counts(document) == ["8"]


def test_format_scale_table_has_a_row_per_site_count_and_the_growth() -> None:
    # Execute
    table = format_scale_table(scale_document(4, 8))

    # Assert
    lines = table.splitlines()
    assert lines[0].startswith("| sites | source models | discover (s) |")
    assert lines[2] == (
        "| 4 | 3 | 2.0 | 4.0 | 6.0 | 40 | 708 | 4 (4), 3 (3), 1 (1) | 0.15 |"
    )
    assert lines[3].startswith("| 8 | 7 | 4.0 | 8.0 | 12.0 | 80 | 716 |")
    assert "discover +0.50 s per added site" in table
    assert "transferability +1.50 s per added site" in table
    assert "coordinator peak RSS +2.00 MiB per added site" in table
    assert "test machine" in table
    assert "One run per site count." in table


def test_format_scale_table_shows_a_failed_run() -> None:
    # Prepare
    document = scale_document(4, 8)
    document["sites"]["16"] = {"error": "flwr run exited with 1"}  # type: ignore[index]

    # Execute
    table = format_scale_table(document)

    # Assert
    assert "| 16 | failed: flwr run exited with 1 |" in table


def test_table_from_with_an_empty_page_only_prints(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the default page in the working folder, which --page "" must leave.
    out = tmp_path / "scale.json"
    out.write_text(json.dumps(scale_document(4, 8)))
    monkeypatch.chdir(tmp_path)
    block = f"<!-- {SCALE_MARKER} -->\nold\n<!-- /{SCALE_MARKER} -->\n"
    page = tmp_path / "docs" / "scale-benchmark.md"
    page.parent.mkdir()
    page.write_text(block)

    # Execute
    exit_code = main(["scale", "--table-from", str(out), "--page", ""])

    # Assert
    assert exit_code == 0
    assert "| 8 | 7 |" in capsys.readouterr().out
    assert page.read_text() == block


def test_table_from_writes_the_benchmarks_docs_page_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a README and the scale page, both with a scale block
    out = tmp_path / "scale.json"
    out.write_text(json.dumps(scale_document(4, 8)))
    monkeypatch.chdir(tmp_path)
    block = f"<!-- {SCALE_MARKER} -->\nold\n<!-- /{SCALE_MARKER} -->\n"
    (tmp_path / "README.md").write_text(block)
    page = tmp_path / "docs" / "scale-benchmark.md"
    page.parent.mkdir()
    page.write_text(block)

    # Execute
    exit_code = main(["scale", "--table-from", str(out)])

    # Assert: the page got the table; the README is never written
    assert exit_code == 0
    assert "| 8 | 7 |" in page.read_text()
    assert (tmp_path / "README.md").read_text() == block


def test_table_from_rewrites_only_the_scale_block(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "scale.json"
    out.write_text(json.dumps(scale_document(4, 8)))
    page = tmp_path / "page.md"
    page.write_text(
        "intro\n<!-- benchmark:tgma -->\nkeep\n<!-- /benchmark:tgma -->\n"
        f"<!-- {SCALE_MARKER} -->\nold\n<!-- /{SCALE_MARKER} -->\nafter\n"
    )

    # Execute
    exit_code = main(["scale", "--table-from", str(out), "--page", str(page)])

    # Assert
    text = page.read_text()
    assert exit_code == 0
    assert "old" not in text
    assert "keep" in text
    assert "| 8 | 7 |" in text
    assert text.endswith(f"<!-- /{SCALE_MARKER} -->\nafter\n")
