"""The ``perf`` benchmark: speed measured against its limits, side by side in one run.

Two measurements of issue-sized questions, each a ratio or a rate taken in one run on
one machine:

- **LFTM against its floor.** LFTM needs two forward passes per candidate (the
  prediction, then the prediction on the attention-masked image), so its floor is
  twice one plain batched inference pass of the same candidates over the same target
  slices. The benchmark times the transferability job's scoring
  (``core.transfer.job.score_slices``: both passes, the keep masks, ITM and the
  candidates' agreement) and the plain pass (``predict_probabilities`` per
  candidate), each the median of ``--repeats`` runs, and reports their ratio
  (target: at most 2.3).
- **Training throughput and memory** of the pipeline's 2-D U-Net with the pipeline's
  loop at 64, 128 and 256 px (:func:`simulations.gpu_check.measure_training`,
  float32), each size in a fresh child process: slices/s and that process's peak
  resident memory (torch itself included).

The candidates are the built-in federation's sources B-F, trained as the pipeline
trains them; the target is A's training images. What it does not measure yet (the
Flower overhead against direct calls, a deployment message's round trip, 3-D
patches, growth with sites and cases) is listed on its page. This module owns the
run, its JSON document and the table between the ``<!-- benchmark:perf -->`` markers
of ``docs/perf-benchmark.md``; the command line is ``simulations.benchmark``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import torch

from core.config import ConfigValue, RunConfig, load_default_config
from core.data.dataset import build_slice_set, index_site, list_site_dirs
from core.logs import quiet
from core.training.job import (
    build_initial_weights,
    build_model_with,
    train_source_model,
)
from core.training.networks import Arrays
from core.training.trainer import predict_probabilities, select_device
from core.transfer.job import score_slices
from simulations.benchmark.output import (
    describe_machine,
    leave_one_out_federation,
    log_progress,
)
from simulations.benchmark.overhead import format_overhead_table, measure_overhead
from simulations.gpu_check import measure_training

PERF_MARKER: Final = "benchmark:perf"
LFTM_TARGET_RATIO: Final = 2.3  # at most this many plain passes (the floor is 2)
TRAINING_SIZES: Final = (64, 128, 256)
# 3-D patches (depth, side): an anisotropic MR's few slices, then a larger block.
PATCHES_3D: Final = ((16, 64), (24, 128))
PATCH_SAMPLES_3D: Final = 8
TRAINING_SAMPLES: Final = 64
TRAINING_EPOCHS: Final = 2


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``run``."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure_lftm(
    target_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    repeats: int,
) -> dict[str, float]:
    """LFTM's scoring against one plain inference pass of the same candidates."""
    slices = build_slice_set(
        index_site(target_dir).training_images, data=config.data, with_labels=False
    )
    device = select_device(config.train.device)
    models = [
        build_model_with(name, weights, config) for name, weights in candidates.items()
    ]

    def plain() -> None:
        for model in models:
            predict_probabilities(model, slices.images, device=device)

    lftm = median_seconds(
        lambda: score_slices(slices, candidates, config, quiet), repeats
    )
    plain_pass = median_seconds(plain, repeats)
    return {
        "candidates": len(candidates),
        "slices": len(slices),
        "lftm_seconds": lftm,
        "plain_pass_seconds": plain_pass,
        "ratio": lftm / plain_pass,
    }


def _train_in_child(
    config: RunConfig, size: int, samples: int, epochs: int, depth: int = 0
) -> tuple[float, float]:
    """One size's training in this (child) process: samples/s and peak RSS in MB."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = measure_training(
        config,
        size=size,
        amp=False,
        samples=samples,
        epochs=epochs,
        device=select_device(config.train.device),
        depth=depth,
    )
    return result.slices_per_second, result.peak_memory_mb


def measure_training_sizes(
    config: RunConfig, sizes: Sequence[int], *, samples: int, epochs: int
) -> list[dict[str, float]]:
    """Training throughput and peak memory per size, each in a fresh process.

    A process's peak resident memory only grows, so each size trains in its own
    child (spawned: a clean interpreter, as a site's training job starts).
    """
    context = multiprocessing.get_context("spawn")
    rows = []
    for size in sorted(sizes):
        with context.Pool(1) as pool:
            rate, memory = pool.apply(_train_in_child, (config, size, samples, epochs))
        rows.append({"size": size, "slices_per_second": rate, "peak_memory_mb": memory})
        log_progress(f"training at {size} px: {rate:.1f} slices/s, {memory:.0f} MB")
    return rows


def measure_training_patches(
    config: RunConfig,
    patches: Sequence[tuple[int, int]],
    *,
    samples: int,
    epochs: int,
) -> list[dict[str, float]]:
    """3-D U-Net training throughput and peak memory per patch, each in a process.

    The pipeline's architecture and training loop, in 3-D; a fresh (spawned) child
    per patch size, as for the 2-D sizes.
    """
    context = multiprocessing.get_context("spawn")
    rows = []
    for depth, size in patches:
        with context.Pool(1) as pool:
            rate, memory = pool.apply(
                _train_in_child, (config, size, samples, epochs, depth)
            )
        rows.append(
            {
                "depth": depth,
                "size": size,
                "patches_per_second": rate,
                "voxels_per_second": rate * depth * size * size,
                "peak_memory_mb": memory,
            }
        )
        log_progress(
            f"3-D training at {depth}x{size}x{size}: {rate:.2f} patches/s, "
            f"{memory:.0f} MB"
        )
    return rows


def run_perf(
    config: RunConfig,
    *,
    federation_dir: Path,
    repeats: int,
    sizes: Sequence[int] = TRAINING_SIZES,
    samples: int = TRAINING_SAMPLES,
    epochs: int = TRAINING_EPOCHS,
    patches_3d: Sequence[tuple[int, int]] = PATCHES_3D,
    patch_samples: int = PATCH_SAMPLES_3D,
    overhead: Mapping[str, ConfigValue] | None = None,
) -> dict[str, object]:
    """Every measurement; the JSON document.

    ``overhead``: the run-config overrides of the simulated run whose phases are
    compared with direct calls (:mod:`simulations.benchmark.overhead`); None skips
    that measurement.
    """
    started = time.perf_counter()
    site_dirs = {path.name: path for path in list_site_dirs(federation_dir)}
    target, *sources = sorted(site_dirs)
    initial = build_initial_weights(config)
    candidates: dict[str, Arrays] = {}
    for name in sources:
        candidates[name] = train_source_model(
            site_dirs[name], config, initial_weights=initial
        ).weights
        log_progress(f"trained source {name}")
    lftm = measure_lftm(site_dirs[target], candidates, config, repeats=repeats)
    log_progress(
        f"LFTM {lftm['lftm_seconds']:.2f} s against a plain pass of "
        f"{lftm['plain_pass_seconds']:.2f} s: x{lftm['ratio']:.2f}"
    )
    training = measure_training_sizes(config, sizes, samples=samples, epochs=epochs)
    patches = measure_training_patches(
        config, patches_3d, samples=patch_samples, epochs=epochs
    )
    overhead_figures = (
        None if overhead is None else measure_overhead(overhead, federation_dir)
    )
    return {
        "machine": describe_machine(),
        "seconds": time.perf_counter() - started,
        "federation": str(federation_dir),
        "target": target,
        **({} if overhead_figures is None else {"overhead": overhead_figures}),
        "repeats": repeats,
        "lftm": lftm,
        "training": {"samples": samples, "epochs": epochs, "sizes": training},
        "training_3d": {
            "samples": patch_samples,
            "epochs": epochs,
            "patches": patches,
        },
    }


def format_perf_table(document: Mapping[str, object]) -> str:
    """Markdown tables of a perf document."""
    lftm = document["lftm"]
    assert isinstance(lftm, Mapping)
    training = document["training"]
    assert isinstance(training, Mapping)
    met = "met" if lftm["ratio"] <= LFTM_TARGET_RATIO else "not met"
    lines = [
        "| LFTM scoring | plain inference pass | ratio | target |",
        "|---|---|---|---|",
        f"| {lftm['lftm_seconds']:.2f} s | {lftm['plain_pass_seconds']:.2f} s | "
        f"{lftm['ratio']:.2f} | at most {LFTM_TARGET_RATIO} ({met}) |",
        "",
        f"{lftm['candidates']} candidates over {lftm['slices']} slices of target "
        f"{document['target']}'s training images; each time the median of "
        f"{document['repeats']} runs.",
        "",
        "| slice side (px) | training slices/s | peak resident memory, its process "
        "(MB) |",
        "|---|---|---|",
    ]
    sizes = training["sizes"]
    assert isinstance(sizes, list)
    for row in sizes:
        lines.append(
            f"| {row['size']} | {row['slices_per_second']:.1f} | "
            f"{row['peak_memory_mb']:.0f} |"
        )
    patches = document.get("training_3d")
    if isinstance(patches, Mapping):
        lines += [
            "",
            "| 3-D patch (depth x side x side) | training patches/s | voxels/s | "
            "peak resident memory, its process (MB) |",
            "|---|---|---|---|",
        ]
        for row in patches["patches"]:
            lines.append(
                f"| {row['depth']} x {row['size']} x {row['size']} | "
                f"{row['patches_per_second']:.2f} | {row['voxels_per_second']:.3g} | "
                f"{row['peak_memory_mb']:.0f} |"
            )
    overhead = document.get("overhead")
    if isinstance(overhead, Mapping):
        lines += ["", *format_overhead_table(overhead)]
    lines += [
        "",
        f"Training: {training['samples']} random slices"
        + (
            f" ({patches['samples']} random patches in 3-D, the same U-Net in 3-D)"
            if isinstance(patches, Mapping)
            else ""
        )
        + f", {training['epochs']} timed epochs after one warm-up, float32. "
        f"Measured on {document['machine']} in {document['seconds']:.0f} s.",
    ]
    return "\n".join(lines)


def add_perf_options(command: argparse.ArgumentParser) -> None:
    """The ``perf`` subcommand's own options."""
    command.add_argument(
        "--repeats", type=int, default=3, help="timed runs per measurement (median)"
    )
    command.add_argument(
        "--no-overhead",
        action="store_true",
        help="skip the simulated pipeline against direct calls (a Flower simulation)",
    )


def run_perf_command(
    args: argparse.Namespace, overrides: Mapping[str, ConfigValue]
) -> dict[str, object]:
    """Run the ``perf`` subcommand from its parsed arguments; return the document."""
    config = load_default_config(**overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    federation = leave_one_out_federation(args, config)
    return run_perf(
        config,
        federation_dir=federation,
        repeats=args.repeats,
        overhead=None if args.no_overhead else dict(overrides),
    )
