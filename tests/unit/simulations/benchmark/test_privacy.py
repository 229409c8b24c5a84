"""The privacy benchmark's table: slice-level and patient-level epsilon side by side."""

from __future__ import annotations

from simulations.benchmark.privacy import format_privacy_table


def document(patient: dict[str, float] | None) -> dict[str, object]:
    """A privacy benchmark document with one model without DP and two with DP."""
    runs = []
    for epsilon, spent, dice in (
        (None, None, 0.98),
        (1.0, 0.99, 0.4),
        (8.0, 7.99, 0.7),
    ):
        run: dict[str, object] = {
            "epsilon": epsilon,
            "epsilon_spent": spent,
            "dice": dice,
            "mia_auc": 0.5,
            "mia_auc_ci": [0.4, 0.6],
            "attack": "loss-threshold",
        }
        if patient is not None:
            run["patient_epsilon_spent"] = (
                None if epsilon is None else patient[f"{epsilon:g}"]
            )
        runs.append(run)
    return {
        "machine": "test machine",
        "seconds": 1.0,
        "settings": {
            "delta": 1e-5,
            "target": "A",
            "source": "C",
            "members": 32,
            "nonmembers": 32,
            "slices_per_case": 10,
            "epochs": 30,
            "references": 4,
            "bootstrap_resamples": 1000,
        },
        "runs": runs,
    }


def test_the_table_states_epsilon_per_slice_and_per_patient() -> None:
    # Execute
    table = format_privacy_table(document({"1": 25.5, "8": 528906.96}))

    # Assert
    lines = table.splitlines()
    assert lines[0].startswith(
        "| model | ε target | ε spent per slice (δ = 1e-05) | ε per patient | "
        "Dice on A |"
    )
    assert lines[2].startswith("| no DP | - | ∞ | ∞ | 0.980 |")
    assert lines[3].startswith("| DP-SGD | 1 | 0.99 | 25.50 | 0.400 |")
    assert lines[4].startswith("| DP-SGD | 8 | 7.99 | 5.3e+05 | 0.700 |")
    assert "10 slices each: the patient-level ε is RDP group privacy" in table


def test_a_document_measured_before_patient_epsilon_shows_a_dash() -> None:
    # Execute
    table = format_privacy_table(document(None))

    # Assert
    assert table.splitlines()[3].startswith("| DP-SGD | 1 | 0.99 | - | 0.400 |")
