"""The GPU check: its measurements on a CPU dry run, and its refusal without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from simulations.gpu_check import main, run_check


def test_a_cpu_dry_run_measures_fp32_and_amp_side_by_side(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "gpu.json"

    # Execute
    code = main(
        [
            "--device",
            "cpu",
            "--sizes",
            "16,32",
            "--samples",
            "4",
            "--epochs",
            "1",
            "--out",
            str(out),
        ]
    )

    # Assert
    assert code == 0
    document = json.loads(out.read_text())
    assert document["device"].startswith("CPU (")
    assert [row["size"] for row in document["training"]] == [16, 32]
    for row in document["training"]:
        assert row["fp32"]["amp"] is False
        assert row["amp"]["amp"] is True
        assert row["fp32"]["slices_per_second"] > 0
        assert row["amp_speedup"] == pytest.approx(
            row["amp"]["slices_per_second"] / row["fp32"]["slices_per_second"]
        )
        assert row["fp32"]["peak_memory_mb"] > 0
    assert "pipeline" not in document


def test_without_cuda_it_refuses_and_says_what_to_do(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "gpu.json"

    # Execute
    code = main(["--out", str(out)])

    # Assert
    assert code == 2
    error = capsys.readouterr().err
    assert "gpu_check: CUDA is not available here" in error
    assert "pass --device cpu for a dry run" in error
    assert not out.exists()


def test_bad_sizes_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    code = main(["--device", "cpu", "--sizes", "64,big"])

    # Assert
    assert code == 2
    assert "--sizes must be integers, got '64,big'" in capsys.readouterr().err


@pytest.mark.gpu
def test_on_cuda_amp_is_measured_beside_fp32() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # Execute
    document = run_check(
        device_name="cuda", sizes=(64,), samples=32, epochs=1, pipeline=False
    )

    # Assert
    (row,) = document["training"]  # type: ignore[misc]
    assert row["amp"]["peak_memory_mb"] > 0
