"""The scaffold every training loop shares: mixed precision, the clock, progress lines.

Source training and TGMA adaptation (``core.training.trainer``), DeepSTAPLE
(``core.consensus.deepstaple``), UG-MCL's rounds (``core.semisup.training``) and DP-SGD
(``core.privacy.dp``) each own their step; they share how a step runs under float16
autocast with gradient scaling (CUDA only: on the CPU both are off and the step is
plain float32), how the wall time is kept, and the progress line's format, the
field's: nnU-Net's one line per epoch with its loss and time, with tqdm's rate and
ETA (``core.logs.progress_note``)::

    [<label>] <N> samples x <E> epochs on cpu, 2 threads
    [<label>] epoch <e>/<E> loss <loss> [<details> ](<s>, <rate> samples/s, eta <t>)
    [<label>] step <s>/<S> ... (<s>, <rate> steps/s, eta <t>)

The first figure is the epoch's time (for steps: since the last line); the last epoch
or step says ``total <t>`` instead of the ETA. Lines go to the loop's
``progress`` callable (a site's, which adds the site's name and enforces its time
cap), else to the ``sitebridge.train`` logger. Pure PyTorch; never imports flwr.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch

from core.logs import Progress, get_logger, progress_note

LOGGER = get_logger("train")


class MixedPrecision:
    """float16 autocast and gradient scaling, on CUDA when asked; off elsewhere.

    Args:
        device: where the step runs.
        amp: whether mixed precision is wanted (it is used on CUDA only).

    Example:
        >>> precision = MixedPrecision(torch.device("cpu"), amp=True)
        >>> precision.enabled
        False
    """

    def __init__(self, device: torch.device, *, amp: bool) -> None:
        self.device_type = device.type
        self.enabled = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward pass's context: float16 autocast when enabled."""
        with torch.autocast(
            device_type=self.device_type, dtype=torch.float16, enabled=self.enabled
        ):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss``, scaled when enabled."""
        self.scaler.scale(loss).backward()  # type: ignore[no-untyped-call]

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscale ``optimizer``'s gradients in place (before clipping them)."""
        self.scaler.unscale_(optimizer)

    def step(self, *optimizers: torch.optim.Optimizer) -> None:
        """Step each optimiser (skipped on overflow when enabled), then rescale."""
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def backward_and_step(
        self, loss: torch.Tensor, *optimizers: torch.optim.Optimizer
    ) -> None:
        """:meth:`backward`, then :meth:`step` of ``optimizers``."""
        self.backward(loss)
        self.step(*optimizers)


def device_description(device: torch.device, *, amp: bool) -> str:
    """``cpu, 2 threads`` or ``cuda:0, AMP``: where a loop runs, for its first line.

    Example:
        >>> torch.set_num_threads(2)
        >>> device_description(torch.device("cpu"), amp=False)
        'cpu, 2 threads'
    """
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    return f"{device}{threads}{', AMP' if amp else ''}"


class TrainingClock:
    """A loop's wall time and its progress lines, prefixed ``[label]``.

    Args:
        label: names the run in progress lines.
        report: called with each line (defaults to the ``sitebridge.train`` logger).

    Example:
        >>> lines = []
        >>> clock = TrainingClock("source:B", lines.append)
        >>> clock.epoch(0, 2, 0.51234, samples=48)
        >>> lines[0].startswith("[source:B] epoch 1/2 loss 0.5123 (")
        True
        >>> " samples/s, eta " in lines[0]
        True
    """

    def __init__(self, label: str, report: Progress | None = None) -> None:
        self.label = label
        self.report = report or LOGGER.info
        self.started = self._mark = time.perf_counter()

    @property
    def seconds(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.started

    def line(self, text: str) -> None:
        """Report ``[label] text``."""
        self.report(f"[{self.label}] {text}")

    def progress(
        self,
        done: int,
        total: int,
        text: str,
        *,
        count: float | None = None,
        unit: str = "steps",
    ) -> None:
        """Report ``[label] text (<s since the last line>, [rate, ]eta <t>)``.

        Args:
            done: steps (or epochs) finished, from 1.
            total: steps in all.
            text: what the line says first (``step 40/200 sup 0.41``).
            count: what was processed since the last line, for the rate.
            unit: what ``count`` counts.
        """
        now = time.perf_counter()
        note = progress_note(
            done,
            total,
            elapsed_s=now - self.started,
            step_s=now - self._mark,
            count=count,
            unit=unit,
        )
        self._mark = now
        self.line(f"{text} ({note})")

    def epoch(
        self,
        epoch: int,
        epochs: int,
        loss: float,
        details: str = "",
        *,
        samples: float | None = None,
    ) -> None:
        """Report the end of epoch ``epoch`` (from 0) of ``epochs`` with its loss.

        ``samples``, what the epoch trained on, gives the rate.
        """
        suffix = f" {details}" if details else ""
        self.progress(
            epoch + 1,
            epochs,
            f"epoch {epoch + 1}/{epochs} loss {loss:.4f}{suffix}",
            count=samples,
            unit="samples",
        )
