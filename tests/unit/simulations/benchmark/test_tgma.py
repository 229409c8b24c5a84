"""The tgma benchmark's table: TGMA as the pipeline predicts, the pair beside it."""

from __future__ import annotations

from simulations.benchmark.tgma import format_tgma_table


def tgma_document(**row_fields: object) -> dict[str, object]:
    """A one-target tgma document with every figure the table reads at 0.5."""
    keys = (
        "best_source",
        "uniform",
        "entropy",
        "tgma",
        "tgma_main_only",
        "tgma_agreement",
        "tgma_agreement_main_only",
        "oracle",
        "spearman_lftm",
        "spearman_entropy",
        "gap_closed",
        "gap_closed_agreement",
        "source_only",
    )
    mean = dict.fromkeys(keys, 0.5)
    row: dict[str, object] = {**mean, "source_only": {"B": 0.5}, **row_fields}
    return {
        "machine": "CPU",
        "seconds": 1.0,
        "targets": {"A": row},
        "mean": mean,
        "ensemble_min_voters": 3,
    }


def test_the_table_marks_a_target_whose_tgma_is_the_voters_average() -> None:
    # Execute
    table = format_tgma_table(
        tgma_document(
            tgma_agreement=0.91,
            tgma_agreement_pair=0.88,
            voters_agreement=["B", "C", "D"],
            tgma_agreement_by_ensemble=True,
        )
    )

    # Assert
    assert "| 0.910 | 0.880 | 0.500 | 3* |" in table
    assert "with at least 3 voters (`transfer.ensemble-min-voters`" in table


def test_a_document_from_before_the_voter_ensemble_shows_its_pair() -> None:
    # Prepare: no pair column, no flag, no ensemble setting
    document = tgma_document(tgma_agreement=0.86, voters_agreement=["B", "C"])
    del document["ensemble_min_voters"]

    # Execute
    table = format_tgma_table(document)

    # Assert
    assert "| 0.860 | 0.860 | 0.500 | 2 |" in table
    assert "under the agreement selection: the adapted pair;" in table
