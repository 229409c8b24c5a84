from __future__ import annotations

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
    clock.epoch(1, 2, 0.123456, "data parameters -0.100..0.200")
    clock.timed("step 4/10 sup 0.5000")

    # Assert
    assert lines[0] == "[deepstaple] 3 samples x 2 epochs on cpu"
    assert lines[1].startswith(
        "[deepstaple] epoch 2/2 loss 0.1235 data parameters -0.100..0.200 ("
    )
    assert lines[1].endswith(" s)")
    assert lines[2].startswith("[deepstaple] step 4/10 sup 0.5000 (")
    assert clock.seconds >= 0.0


def test_device_description_names_threads_on_the_cpu_and_amp() -> None:
    text = device_description(torch.device("cpu"), amp=True)
    assert text == f"cpu, {torch.get_num_threads()} threads, AMP"
