"""The controlled part of the ``consensus`` benchmark: noisy labels of known quality.

The clean labels of some sites' training slices are damaged in controlled ways
(:func:`core.consensus.noisy_labels.build_noisy_label_set`: erosion, dilation, shifts,
elastic warps at several levels and one empty or swapped label per image), so every
noisy label's true Dice is known. Each image's labels are fused by majority vote, STAPLE
and DeepSTAPLE (docs/methods.md#deepstaple), and the benchmark reports each consensus'
Dice against the clean labels, how well DeepSTAPLE's data parameters and STAPLE's
sensitivities rank the labels by true Dice, and the Dice on the sites' evaluation cases
of a fresh model trained on each consensus. It calls the ``core`` functions directly,
without Flower. This module owns that run and the table of the whole ``consensus``
document (controlled and pipeline rows; ``docs/consensus-benchmark.md``); the command
line is ``simulations.benchmark``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from core.coerce import is_number
from core.config import ConfigValue, RunConfig, load_default_config
from core.consensus.deepstaple import train_deepstaple, weighted_vote
from core.consensus.noisy_labels import NoisyLabel, build_noisy_label_set
from core.consensus.staple import majority_vote, staple
from core.data.dataset import SliceSet, build_slice_set, index_site, list_site_dirs
from core.metrics import mask_dice, score_cases, spearman
from core.training.networks import build_model
from core.training.trainer import predict_probabilities, select_device, train_supervised
from simulations.benchmark.output import log_progress

CONSENSUS_MARKER: Final = "benchmark:consensus"
# The controlled run's scale: about 3-4 minutes on 2 CPU cores. Build its config with
# build_controlled_config; DeepSTAPLE's learning rates and switches stay at the
# pyproject defaults (docs/methods.md#out-of-line-update).
CONTROLLED_RUN_CONFIG: Final[dict[str, ConfigValue]] = {
    "data.image-size": 32,
    "data.max-slices-per-case": 0,
    "model.channels": "16,32,64",
    "model.strides": "2,2",
    "consensus.epochs": 30,
    "consensus.batch-size": 32,
    "train.epochs": 40,
}
CONTROLLED_SITE_COUNT: Final = 1  # the federation's first sites, in folder order
TRAINED_KEYS: Final = ("majority", "staple", "deepstaple", "clean", "random_label")
MISSING: Final = "—"

Mask = npt.NDArray[np.bool_]


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ControlledImages:
    """The 2-D training slices whose clean label has foreground.

    Attributes:
        images: ``(M, 1, S, S)`` network inputs.
        clean: ``(M, S, S)`` clean binary labels (foreground = label > 0).
        sites: the sites they were cut from.
    """

    images: torch.Tensor
    clean: Mask
    sites: tuple[str, ...]


def build_controlled_config(overrides: Mapping[str, ConfigValue]) -> RunConfig:
    """Load the defaults with :data:`CONTROLLED_RUN_CONFIG`, then ``overrides``, on top.

    Raises:
        ValueError: an override names an unknown key or breaks a config rule.
    """
    return load_default_config(**{**CONTROLLED_RUN_CONFIG, **overrides})


def build_controlled_images(
    site_dirs: Sequence[Path], *, config: RunConfig
) -> ControlledImages:
    """Cut the sites' labelled training cases into slices; keep those with foreground.

    Dice against an empty truth is undefined, so slices whose clean label is empty
    are dropped.

    Raises:
        ValueError: a site has no labelled training case, or none of its slices has
            foreground.
    """
    images: list[torch.Tensor] = []
    clean: list[Mask] = []
    for site_dir in site_dirs:
        index = index_site(site_dir)
        if not index.labelled:
            raise ValueError(f"site {index.name} ({site_dir}): no labelled cases")
        slices = build_slice_set(index.labelled, data=config.data, with_labels=True)
        assert slices.labels is not None
        foreground = (slices.labels > 0).flatten(1).any(dim=1)
        if not bool(foreground.any()):
            raise ValueError(
                f"site {index.name} ({site_dir}): none of its {len(slices)} labelled "
                "training slices has foreground"
            )
        images.append(slices.images[foreground])
        clean.append((slices.labels[foreground] > 0).numpy())
    return ControlledImages(
        images=torch.cat(images),
        clean=np.concatenate(clean),
        sites=tuple(Path(path).name for path in site_dirs),
    )


def build_evaluation_slices(
    site_dirs: Sequence[Path], *, config: RunConfig
) -> SliceSet:
    """Cut the sites' evaluation cases into labelled slices.

    Raises:
        ValueError: none of the sites has an evaluation case.
    """
    cases = [case for path in site_dirs for case in index_site(path).evaluation]
    if not cases:
        names = [Path(path).name for path in site_dirs]
        raise ValueError(f"sites {names}: no evaluation cases")
    return build_slice_set(cases, data=config.data, with_labels=True)


def _evaluate_trained(
    labels: torch.Tensor,
    images: torch.Tensor,
    *,
    evaluation: SliceSet,
    config: RunConfig,
    seed: int,
    name: str,
    progress: Callable[[str], None],
) -> float:
    """Train a fresh model on ``labels``; return its mean Dice over evaluation cases."""
    device = select_device(config.train.device)
    torch.manual_seed(seed)
    model = build_model(config.model, data=config.data)
    train_supervised(
        model,
        images,
        labels,
        train=config.train,
        device=device,
        label=f"trained on {name}",
        progress=progress,
    )
    assert evaluation.labels is not None
    probabilities = predict_probabilities(
        model, evaluation.images, device=device, amp=config.train.amp
    )
    scores = score_cases(
        (probabilities.argmax(dim=1) > 0).long(),
        (evaluation.labels > 0).long(),
        case_of_slice=evaluation.case_of_slice,
        case_ids=evaluation.case_ids,
        spacing_mm=evaluation.spacing_mm,
        num_classes=2,
        with_hd95=False,
    )
    return scores.dice


def _summarise_by_corruption(
    noisy: Sequence[NoisyLabel],
    data_parameters: Sequence[float],
    sensitivities: Sequence[float],
) -> dict[str, dict[str, float]]:
    """Mean true Dice, data parameter and STAPLE sensitivity per corruption@level."""
    groups: dict[str, list[int]] = {}
    for row, label in enumerate(noisy):
        groups.setdefault(f"{label.corruption.value}@{label.level:g}", []).append(row)
    return {
        key: {
            "count": len(rows),
            "true_dice": float(np.mean([noisy[row].true_dice for row in rows])),
            "data_parameter": float(np.mean([data_parameters[row] for row in rows])),
            "staple_sensitivity": float(np.nanmean([sensitivities[r] for r in rows]))
            if any(math.isfinite(sensitivities[row]) for row in rows)
            else math.nan,
        }
        for key, rows in sorted(groups.items())
    }


def run_controlled(
    config: RunConfig,
    *,
    federation_dir: Path,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    progress: Callable[[str], None] = log_progress,
) -> dict[str, object]:
    """Fuse controlled noisy labels three ways; score the fusions and their models.

    Consensus Dice (``majority``, ``staple``, ``deepstaple``) is the mean over images
    (2-D slices) of the Dice between the fused label and the clean one.
    ``spearman_dp`` and ``spearman_staple`` are Spearman's rho, pooled over every
    noisy label of every image, between the true Dice and DeepSTAPLE's raw data
    parameter or STAPLE's per-rater sensitivity. STAPLE's sensitivity is nan only
    where it is undefined (every label of the image empty); those labels are left
    out of ``spearman_staple`` and counted in ``staple_nan_sensitivities``.
    DeepSTAPLE trains a fresh ``build_model`` network on every (image, noisy label)
    pair with ``config.consensus`` (epochs, batch size, learning rates, switches)
    and fuses each image by :func:`core.consensus.deepstaple.weighted_vote`. ``trained``
    holds the Dice on the sites' evaluation cases of a fresh model trained with
    ``config.train`` on each consensus, on the clean labels (upper bound) and on one
    random noisy label per image (lower bound); every such model starts from the
    same initial weights.

    Args:
        config: the run config (see :func:`build_controlled_config` for its scale).
        federation_dir: a federation folder.
        seed: seeds the corruptions, the random label, the initial weights and
            DeepSTAPLE's data order.
        sites: site folder names to use; default the first
            :data:`CONTROLLED_SITE_COUNT` in folder order.
        progress: called with progress lines.

    Returns:
        The JSON-able document (floats, ints, strings, lists and dicts): the keys
        above, plus ``noisy_label_dice`` (mean true Dice of all noisy labels),
        ``random_label_dice`` (of the one random label per image), ``best_label_dice``
        (of each image's best label: what picking one label can reach),
        ``top_dp_label_dice`` (of each image's highest-DP label), ``by_corruption``
        (count, mean true Dice, data parameter and STAPLE sensitivity per
        ``kind@level``), the sites, image and label counts, the image size, model
        channels, DeepSTAPLE's epochs, batch size, final loss and seconds, the
        training epochs and the total ``seconds``.

    Raises:
        ValueError: a site is unknown, has no labelled case or no slice with
            foreground, or no site has an evaluation case.
    """
    started = time.perf_counter()
    available = {path.name: path for path in list_site_dirs(federation_dir)}
    names = (
        list(sites) if sites is not None else list(available)[:CONTROLLED_SITE_COUNT]
    )
    unknown = [name for name in names if name not in available]
    if unknown or not names:
        raise ValueError(
            f"sites {unknown or names} not in {federation_dir} "
            f"(sites there: {sorted(available)})"
        )
    site_dirs = [available[name] for name in names]
    controlled = build_controlled_images(site_dirs, config=config)
    evaluation = build_evaluation_slices(site_dirs, config=config)
    noisy = build_noisy_label_set(list(controlled.clean), seed=seed)
    per_image = len(noisy[0])
    flat = [label for image_labels in noisy for label in image_labels]
    stacks = [np.stack([label.mask for label in row]) for row in noisy]
    progress(
        f"[consensus] {len(noisy)} images from sites {', '.join(names)}, "
        f"{per_image} noisy labels each"
    )

    majority = [majority_vote(stack) for stack in stacks]
    staples = [staple(stack) for stack in stacks]
    torch.manual_seed(seed)
    deep = train_deepstaple(
        controlled.images.repeat_interleave(per_image, dim=0),
        torch.from_numpy(np.stack([label.mask for label in flat])).long(),
        model=build_model(config.model, data=config.data),
        num_classes=config.data.num_classes,
        epochs=config.consensus.epochs,
        batch_size=config.consensus.batch_size,
        learning_rate=config.consensus.learning_rate,
        dp_learning_rate=config.consensus.dp_learning_rate,
        out_of_line=config.consensus.out_of_line,
        fixed_weighting=config.consensus.fixed_weighting,
        risk_regularisation=config.consensus.risk_regularisation,
        device=select_device(config.train.device),
        seed=seed,
        amp=config.train.amp,
        progress=progress,
    )
    data_parameters = deep.data_parameters.reshape(len(noisy), per_image)
    fused = [
        weighted_vote(stack, raw)
        for stack, raw in zip(stacks, data_parameters, strict=True)
    ]
    rng = np.random.default_rng(seed)
    random_label = [row[int(rng.integers(per_image))].mask for row in noisy]

    def mean_dice(masks: Sequence[Mask]) -> float:
        return float(
            np.mean(
                [mask_dice(m, c) for m, c in zip(masks, controlled.clean, strict=True)]
            )
        )

    sensitivities = [value for result in staples for value in result.sensitivity]
    true_dice = [label.true_dice for label in flat]
    raw = [float(value) for value in deep.data_parameters]
    document: dict[str, object] = {
        "majority": mean_dice(majority),
        "staple": mean_dice([result.consensus for result in staples]),
        "deepstaple": mean_dice(fused),
        "spearman_dp": spearman(raw, true_dice),
        "spearman_staple": spearman(sensitivities, true_dice),
        "staple_nan_sensitivities": sum(not math.isfinite(v) for v in sensitivities),
        "noisy_label_dice": float(np.mean(true_dice)),
        "best_label_dice": float(
            np.mean([max(label.true_dice for label in row) for row in noisy])
        ),
        "top_dp_label_dice": float(
            np.mean(
                [
                    row[int(np.argmax(raw_row))].true_dice
                    for row, raw_row in zip(noisy, data_parameters, strict=True)
                ]
            )
        ),
        "random_label_dice": mean_dice(random_label),
        "by_corruption": _summarise_by_corruption(flat, raw, sensitivities),
        "sites": list(names),
        "images": len(noisy),
        "labels": len(flat),
        "labels_per_image": per_image,
        "image_size": config.data.image_size,
        "model_channels": list(config.model.channels),
        "deepstaple_epochs": config.consensus.epochs,
        "deepstaple_batch_size": config.consensus.batch_size,
        "deepstaple_final_loss": deep.epoch_losses[-1] if deep.epoch_losses else None,
        "deepstaple_seconds": deep.seconds,
        "train_epochs": config.train.epochs,
    }
    progress(
        f"[consensus] consensus Dice: majority {document['majority']:.3f} STAPLE "
        f"{document['staple']:.3f} DeepSTAPLE {document['deepstaple']:.3f}; "
        f"Spearman DP {document['spearman_dp']:.2f} "
        f"STAPLE {document['spearman_staple']:.2f}"
    )
    label_sets = {
        "majority": majority,
        "staple": [result.consensus for result in staples],
        "deepstaple": fused,
        "clean": list(controlled.clean),
        "random_label": random_label,
    }
    trained: dict[str, float] = {}
    for name in TRAINED_KEYS:
        trained[name] = _evaluate_trained(
            torch.from_numpy(np.stack(label_sets[name])).long(),
            controlled.images,
            evaluation=evaluation,
            config=config,
            seed=seed,
            name=name,
            progress=progress,
        )
        progress(f"[consensus] trained on {name}: Dice {trained[name]:.3f}")
    document["trained"] = trained
    document["seconds"] = time.perf_counter() - started
    return document


def _cell(section: Mapping[str, object] | None, key: str, digits: int) -> str:
    """Format ``section[key]`` with ``digits`` decimals; a dash when absent or nan."""
    value = None if section is None else section.get(key)
    if not is_number(value):
        return MISSING
    return f"{value:.{digits}f}" if math.isfinite(value) else MISSING


def _section(document: Mapping[str, object], key: str) -> Mapping[str, object] | None:
    value = document.get(key)
    return value if isinstance(value, Mapping) else None


def _table_row(
    name: str,
    section: Mapping[str, object],
    deepstaple: Mapping[str, object] | None,
) -> str:
    """One table row; ``deepstaple`` (one granularity's figures) overrides its cells."""
    trained = _section(section, "trained")
    own = section if deepstaple is None else deepstaple
    own_trained: Mapping[str, object] | None = (
        trained if deepstaple is None else {"deepstaple": deepstaple.get("trained")}
    )
    cells = [
        *(_cell(section, method, 3) for method in ("itm", "majority", "staple")),
        _cell(own, "deepstaple", 3),
        *(_cell(trained, method, 3) for method in ("itm", "majority", "staple")),
        _cell(own_trained, "deepstaple", 3),
        _cell(own, "spearman_dp", 2),
        _cell(section, "spearman_staple", 2),
        _cell(own, "auroc_dp", 2),
        _cell(section, "auroc_staple", 2),
    ]
    return f"| {name} | {' | '.join(cells)} |"


def format_consensus_table(document: Mapping[str, object]) -> str:
    """Markdown table of a ``consensus`` benchmark document (controlled + pipeline).

    One row per setting present; a dash for a value a setting lacks (ITM
    pseudo-labels exist in the pipeline only, STAPLE's Spearman may be absent there,
    the within-case AUROCs exist in the pipeline only and not in documents older
    than them). A pipeline run with several data-parameter granularities gets one
    row per granularity (``pipeline, <g> DPs``): the baselines' cells repeat, the
    DeepSTAPLE cells are that granularity's. Likewise a run with several
    data-parameter priors (``--priors``) gets one row per prior (``pipeline, <p>
    prior``), at the first granularity.
    """
    lines = [
        "| setting | ITM | majority | STAPLE | DeepSTAPLE | trained on ITM | "
        "trained on majority | trained on STAPLE | trained on DeepSTAPLE | "
        "Spearman DP | Spearman STAPLE | AUROC DP | AUROC STAPLE |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setting in ("controlled", "pipeline"):
        section = _section(document, setting)
        if section is None:
            continue
        by_granularity = _section(section, "granularity")
        by_prior = _section(section, "prior")
        several_granularities = by_granularity is not None and len(by_granularity) > 1
        several_priors = by_prior is not None and len(by_prior) > 1
        if not several_granularities and not several_priors:
            lines.append(_table_row(setting, section, None))
            continue
        if several_granularities:
            assert by_granularity is not None
            for granularity in by_granularity:
                lines.append(
                    _table_row(
                        f"{setting}, {granularity} DPs",
                        section,
                        _section(by_granularity, granularity),
                    )
                )
        if several_priors:
            assert by_prior is not None
            for prior in by_prior:
                lines.append(
                    _table_row(
                        f"{setting}, {prior} prior",
                        section,
                        _section(by_prior, prior),
                    )
                )
    lines.append("")
    controlled = _section(document, "controlled")
    bounds = _section(controlled, "trained") if controlled is not None else None
    if bounds is not None:
        lines.append(
            "Controlled: models trained on the clean labels reach "
            f"{_cell(bounds, 'clean', 3)}, on one random noisy label per image "
            f"{_cell(bounds, 'random_label', 3)}."
        )
    lines.append(
        f"Measured on {document.get('machine', 'an unknown machine')} in "
        f"{_cell(document, 'seconds', 0)} s."
    )
    return "\n".join(lines)
