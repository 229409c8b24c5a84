"""Check and time the GPU path: ``python -m simulations.gpu_check``.

Meant for a machine with CUDA (docs/development.md#the-gpu-path). It trains the
pipeline's 2-D U-Net with the pipeline's own loop (``core.training.trainer``:
Dice + cross-entropy, Adam, augmentation) on random slices at each ``--sizes`` side,
once in float32 and once with AMP (float16 autocast and gradient scaling), and records
training throughput (slices/s) and peak memory for both, and their ratio, side by side
in one run. ``--pipeline`` then runs the whole demo pipeline as a local Flower
simulation with ``train.device = "cuda"`` and records its wall time and exit status.
The document goes to ``--out`` (``benchmarks/gpu.json``).

Without CUDA it refuses, naming what it found, unless ``--device cpu`` asks for a dry
run of the same measurements on the CPU (what the tests run). Never imports flwr: the
pipeline runs in a child process, as ``make demo`` runs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import torch

from core.config import RunConfig, load_default_config
from core.training.networks import build_model
from core.training.trainer import train_supervised

DEFAULT_SIZES: Final = (64, 128, 256)
# Random slices per size and timed epochs: enough to reach a steady rate on a GPU
# (the first epoch, with cuDNN's autotuning and allocations, is timed apart).
DEFAULT_SAMPLES: Final = 256
DEFAULT_EPOCHS: Final = 3
NO_CUDA: Final = (
    "gpu_check: CUDA is not available here (torch {version}, built for CUDA "
    "{cuda}); run it on a GPU machine, or pass --device cpu for a dry run on the CPU"
)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Throughput:
    """One training run's speed and memory."""

    size: int
    amp: bool
    slices_per_second: float  # samples: slices, or 3-D patches when depth > 0
    peak_memory_mb: float  # CUDA: peak allocated; CPU: the process's peak RSS
    warmup_seconds: float
    depth: int = 0  # 3-D patches of depth x size x size; 0 = 2-D slices


def describe_device(device: torch.device) -> str:
    """The device in words, with torch's version."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{name} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    return f"CPU ({platform.machine()}, torch {torch.__version__})"


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # The process's resident high-water mark: VmHWM (Linux), which a new program
    # starts afresh; ru_maxrss (KiB) elsewhere, which on Linux a child keeps from
    # the parent it was forked from.
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(
    config: RunConfig,
    *,
    size: int,
    amp: bool,
    samples: int,
    epochs: int,
    device: torch.device,
    depth: int = 0,
) -> Throughput:
    """Train a fresh U-Net on ``samples`` random ``size``-px slices; time it.

    With ``depth`` > 0 the U-Net is the same architecture in 3-D, trained on
    ``depth x size x size`` patches by the same loop. One warm-up epoch is timed
    apart; the throughput is over the ``epochs`` after it.
    """
    generator = torch.Generator().manual_seed(size)
    extent = (depth, size, size) if depth else (size, size)
    images = torch.randn(samples, 1, *extent, generator=generator)
    labels = (images[:, 0] > 0.5).to(torch.int64)
    model = build_model(config.model, data=config.data, spatial_dims=3 if depth else 2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(count: int) -> float:
        train = dataclasses.replace(config.train, epochs=count, amp=amp)
        _synchronise(device)
        started = time.perf_counter()
        train_supervised(
            model,
            images,
            labels,
            train=train,
            device=device,
            label="gpu-check",
            progress=lambda _line: None,
        )
        _synchronise(device)
        return time.perf_counter() - started

    warmup = run(1)
    seconds = run(epochs)
    return Throughput(
        size=size,
        amp=amp,
        slices_per_second=samples * epochs / seconds,
        peak_memory_mb=_peak_memory_mb(device),
        warmup_seconds=warmup,
        depth=depth,
    )


def run_pipeline(timeout_s: float) -> dict[str, object]:
    """The demo pipeline as a local Flower simulation on CUDA, in a child process."""
    command = [
        sys.executable,
        "-m",
        "simulations.simulate",
        "--num-supernodes",
        "6",
        "--run-config",
        'train.device="cuda"',
    ]
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, check=False, timeout=timeout_s)
        status: object = completed.returncode
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout_s:g} s"
    return {
        "command": " ".join(command),
        "exit_status": status,
        "seconds": time.perf_counter() - started,
    }


def run_check(
    *,
    device_name: str,
    sizes: Sequence[int],
    samples: int,
    epochs: int,
    pipeline: bool,
    pipeline_timeout_s: float = 1800.0,
) -> dict[str, object]:
    """Every measurement; the JSON document.

    Raises:
        RuntimeError: CUDA asked for and not available (the message says what to do).
    """
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            NO_CUDA.format(version=torch.__version__, cuda=torch.version.cuda)
        )
    device = torch.device(device_name)
    config = load_default_config(**{"train.device": device_name})
    rows = []
    for size in sizes:
        pair = {
            amp: measure_training(
                config,
                size=size,
                amp=amp,
                samples=samples,
                epochs=epochs,
                device=device,
            )
            for amp in (False, True)
        }
        rows.append(
            {
                "size": size,
                "fp32": dataclasses.asdict(pair[False]),
                "amp": dataclasses.asdict(pair[True]),
                # AMP only acts on CUDA (core.training.trainer): 1.0 expected on CPU.
                "amp_speedup": pair[True].slices_per_second
                / pair[False].slices_per_second,
            }
        )
        print(
            f"{size} px: fp32 {pair[False].slices_per_second:.0f} slices/s, "
            f"AMP {pair[True].slices_per_second:.0f} slices/s "
            f"(x{rows[-1]['amp_speedup']:.2f})",
            flush=True,
        )
    document: dict[str, object] = {
        "device": describe_device(device),
        "batch_size": config.train.batch_size,
        "samples": samples,
        "epochs": epochs,
        "training": rows,
    }
    if pipeline:
        document["pipeline"] = run_pipeline(pipeline_timeout_s)
    return document


def build_parser() -> argparse.ArgumentParser:
    """The command line (``--help`` lists it)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulations.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N or cpu"
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(size) for size in DEFAULT_SIZES),
        help="slice sides in px, comma-separated (default 64,128,256)",
    )
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    parser.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="also run the whole demo pipeline as a Flower simulation on CUDA",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/gpu.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the check; 0 when the document was written, 2 on a refusal."""
    args = build_parser().parse_args(argv)
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        print(
            f"gpu_check: --sizes must be integers, got {args.sizes!r}", file=sys.stderr
        )
        return 2
    try:
        document = run_check(
            device_name=args.device,
            sizes=sizes,
            samples=args.samples,
            epochs=args.epochs,
            pipeline=args.pipeline,
        )
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"gpu_check: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
