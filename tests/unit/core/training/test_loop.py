from __future__ import annotations

import logging
import re

import pytest
import torch

from core.training.loop import MixedPrecision, TrainingClock, device_description


def test_mixed_precision_is_off_on_the_cpu_and_steps_plainly() -> None:
    # Prepare
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    precision = MixedPrecision(torch.device("cpu"), amp=True)
    before = layer.weight.detach().clone()

    # Execute
    with precision.autocast():
        loss = layer(torch.ones(1, 2)).sum()
    assert loss.dtype == torch.float32  # no float16 autocast on the CPU
    precision.backward_and_step(loss, optimizer)

    # Assert: an unscaled SGD step, weight - lr * grad (grad of sum = the input)
    assert not precision.enabled
    assert torch.allclose(layer.weight, before - 0.5)


def test_clock_lines_keep_the_loops_format() -> None:
    # Prepare
    lines: list[str] = []
    clock = TrainingClock("deepstaple", lines.append)

    # Execute
    clock.line("3 samples x 2 epochs on cpu")
    clock.epoch(0, 2, 0.123456, "data parameters -0.100..0.200", samples=3)
    clock.epoch(1, 2, 0.1, samples=3)
    clock.progress(4, 10, "step 4/10 sup 0.5000", count=4)

    # Assert: the epoch's time, its rate and the ETA (the last epoch: the total)
    assert lines[0] == "[deepstaple] 3 samples x 2 epochs on cpu"
    assert re.fullmatch(
        r"\[deepstaple\] epoch 1/2 loss 0\.1235 data parameters -0\.100\.\.0\.200 "
        r"\([\d.]+ s, [\d.]+ samples/s, eta [\d.]+ s\)",
        lines[1],
    )
    assert re.fullmatch(
        r"\[deepstaple\] epoch 2/2 loss 0\.1000 "
        r"\([\d.]+ s, [\d.]+ samples/s, total [\d.]+ s\)",
        lines[2],
    )
    assert re.fullmatch(
        r"\[deepstaple\] step 4/10 sup 0\.5000 "
        r"\([\d.]+ s, [\d.]+ steps/s, eta [\d.]+ s\)",
        lines[3],
    )
    assert clock.seconds >= 0.0


def test_the_default_sink_is_the_sitebridge_train_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare
    clock = TrainingClock("source:B")

    # Execute
    with caplog.at_level(logging.INFO, logger="sitebridge.train"):
        clock.line("12 samples x 2 epochs on cpu")

    # Assert
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("sitebridge.train", "[source:B] 12 samples x 2 epochs on cpu")
    ]


def test_device_description_names_threads_on_the_cpu_and_amp() -> None:
    text = device_description(torch.device("cpu"), amp=True)
    assert text == f"cpu, {torch.get_num_threads()} threads, AMP"
