"""The ``train.consensus`` job: label consensus at the target site.

docs/methods.md#deepstaple. At the target, every image
gets one noisy label per candidate model (its prediction) and one per atlas in the
site's ``atlases/`` folder (registered onto it with SimpleITK,
``core.consensus.registration``). The noisy labels are fused four ways:

- ``itm``: TGMA's pseudo-labels, the ITM-weighted mixture of the candidates' softmax
  maps (what adaptation trains on; atlases do not take part);
- ``majority``: voxelwise majority vote;
- ``staple``: STAPLE over each case's labels as 3-D stacks (one sensitivity per
  label source and case);
- ``deepstaple``: DeepSTAPLE data parameters learned per (2-D slice, label source),
  as docs/methods.md#data-parameters fixes for 2-D networks, or per (case, label
  source) as in the paper (``consensus.granularity``), then softmax-weighted voting
  per slice; the data parameters start flat (the paper) or from each label source's
  DTM or agreement with TGMA's main on the target's images (``consensus.dp-prior``).

Images are the target's training images and, when it has them, its evaluation images:
their evaluation labels are read only to score each consensus and the data
parameters, never to train. DeepSTAPLE trains on the slices where some noisy label
has foreground (a slice where every label is empty has an empty consensus whatever the
weights). The consensus labels of the training images are written at the site as
NIfTI on each image's grid; the start model is then trained on the training images
with each consensus. Only aggregate figures and the trained weights are returned.
Never imports flwr.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import torch

from core.config import ConsensusGranularity, ConsensusPrior, RunConfig
from core.consensus.deepstaple import (
    prior_data_parameters,
    train_deepstaple,
    weighted_vote,
)
from core.consensus.registration import (
    RegistrationSettings,
    index_atlases,
    read_atlas,
    transfer_atlas_labels,
)
from core.consensus.staple import majority_vote, multi_label_staple, staple
from core.data.dataset import (
    CaseRecord,
    SiteDataError,
    SliceSet,
    build_slice_set,
    index_site,
    label_slices,
    label_volume_from_slices,
)
from core.data.io import read_volume, write_volume
from core.logs import Countdown, Progress, quiet
from core.metrics import auroc, dice_score, spearman
from core.protocol import ATLAS_SOURCE_PREFIX, CONSENSUS_METHODS
from core.training.job import build_model_with
from core.training.networks import Arrays, build_model, get_weights
from core.training.trainer import predicted_classes, select_device, train_supervised
from core.transfer.job import score_slices, select_pair
from core.transfer.transferability import build_pseudo_labels

# The consensus reply's Spearman figures need 3 evaluation images with a defined
# score (nan below: two points always correlate perfectly).
_SPEARMAN_MIN_PAIRS: Final = 3
# The within-case AUROC counts a label source as good on a case when its label's true
# Dice there is at least this: the pipeline's sources are bimodal (a source either
# segments the target's structure, Dice about 0.7-0.95, or misses it, Dice near 0), so
# any threshold between the modes gives the same split; 0.5 is their midpoint.
GOOD_LABEL_DICE: Final = 0.5


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class NoisyLabelSet:
    """The noisy labels of the target's slices, one stack row per label source.

    Attributes:
        slices: the target's images: its training images, then every evaluation
            image, labelled or not (the labels decide nothing here).
        num_training_cases: how many of ``slices.case_ids`` are training cases.
        sources: label source names: candidates, then ``atlas-1``..``atlas-K``.
        labels: ``(A, N, S, S)`` int64 classes, row a from ``sources[a]``.
        itm_labels: ``(N, S, S)`` TGMA pseudo-labels.
        dtm: per source, its DTM on these images (nan for an atlas).
        agreement: per source, the mean Dice between its predictions and those of
            TGMA's main (``transfer.selection``'s) on these images (nan for an atlas).
    """

    slices: SliceSet
    num_training_cases: int
    sources: tuple[str, ...]
    labels: torch.Tensor
    itm_labels: torch.Tensor
    dtm: tuple[float, ...] = ()
    agreement: tuple[float, ...] = ()

    def prior_scores(self, prior: ConsensusPrior) -> tuple[float, ...] | None:
        """Per source, the label-free score its data parameters start from.

        None for ``ConsensusPrior.NONE`` (the flat start).

        Raises:
            ValueError: the set holds no score for ``prior``, one per source.
        """
        if prior is ConsensusPrior.NONE:
            return None
        scores = self.dtm if prior is ConsensusPrior.DTM else self.agreement
        if len(scores) != len(self.sources):
            raise ValueError(
                f"consensus.dp-prior = {str(prior)!r} needs one score per label source "
                f"({len(self.sources)}), the noisy label set holds {len(scores)}"
            )
        return scores

    @property
    def training_rows(self) -> torch.Tensor:
        """Boolean ``(N,)``: the slice belongs to a training image."""
        return self.slices.case_of_slice < self.num_training_cases


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusOutcome:
    """What the consensus job computed; only aggregates and weights may leave.

    Attributes:
        models: consensus method -> the start model trained on that consensus.
        fused: consensus method -> ``(N, S, S)`` labels (stay at the site).
        data_parameters: ``(A, N)`` raw data parameters (nan on slices DeepSTAPLE
            did not train on); stays at the site.
        labels_dir: where the consensus labels were written (at the site).
        auroc_dp, auroc_staple: the within-case AUROC of the data parameters and of
            STAPLE's sensitivities separating good label sources from wrong ones on
            the evaluation images (see :class:`_EvaluationScores`); benchmark
            figures, not sent in the reply.
        the other fields: see :class:`core.protocol.ConsensusReply`.
    """

    models: dict[str, Arrays]
    fused: dict[str, torch.Tensor]
    data_parameters: npt.NDArray[np.float32]
    labels_dir: Path | None
    num_images: int
    num_labels: int
    num_atlases: int
    seconds: float
    data_parameter: dict[str, float]
    staple_sensitivity: dict[str, float]
    agreement: dict[str, float]
    label_dice: dict[str, float]
    spearman_dp: float
    spearman_staple: float
    auroc_dp: float
    auroc_staple: float


def _atlas_labels(
    cases: Sequence[CaseRecord],
    atlas_cases: Sequence[CaseRecord],
    config: RunConfig,
    progress: Progress,
) -> list[torch.Tensor]:
    """Per atlas, its label registered onto every case and cut into slices."""
    num_classes = config.data.num_classes
    atlases = [read_atlas(case, num_classes=num_classes) for case in atlas_cases]
    per_atlas: list[list[torch.Tensor]] = [[] for _ in atlases]
    settings = RegistrationSettings()
    countdown = Countdown(len(cases))
    for case in cases:
        target = read_volume(case.image_path)
        transferred = transfer_atlas_labels(
            target, atlases, settings=settings, target_name=str(case.image_path)
        )
        for row, atlas_label in zip(per_atlas, transferred, strict=True):
            row.append(
                label_slices(
                    atlas_label.label, data=config.data, spacing_mm=target.spacing_mm
                )
            )
        progress(
            f"[consensus] registered {len(atlases)} atlas(es) onto image "
            f"{countdown.tick()}"
        )
    return [torch.cat(rows) for rows in per_atlas]


def build_noisy_label_set(
    site_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    with_atlases: bool,
    progress: Progress = quiet,
) -> NoisyLabelSet:
    """Label the target's images with every candidate (and atlas, if asked).

    Raises:
        SiteDataError: the site has no images, or an atlas is unreadable.
        RegistrationError: an atlas could not be registered onto an image.
        ValueError: no candidates, a candidate named like an atlas
            (``atlas-<k>``), or a candidate's weights do not fit the model.
    """
    if not candidates:
        raise ValueError("no candidate models to label the target's images with")
    reserved = sorted(
        name for name in candidates if name.startswith(ATLAS_SOURCE_PREFIX)
    )
    if reserved:
        # Such a model would be counted, and reported, as one of the site's atlases.
        raise ValueError(
            f"label sources {reserved} use the prefix {ATLAS_SOURCE_PREFIX!r}, "
            "which names the site's atlases"
        )
    index = index_site(Path(site_dir))
    training = index.training_images
    if not training:
        raise SiteDataError(
            f"{index.root}: no training images (imagesTr) to build consensus labels on"
        )
    cases = training + index.evaluation_images
    slices = build_slice_set(cases, data=config.data, with_labels=False)
    transferability, probabilities = score_slices(slices, candidates, config, progress)
    itm_labels = predicted_classes(
        build_pseudo_labels(
            probabilities,
            torch.tensor(transferability.itm),
            case_of_slice=slices.case_of_slice,
        )
    )
    rows = [predicted_classes(probability) for probability in probabilities]
    sources = list(transferability.sources)
    # Label-free scores for consensus.dp-prior: images only, like the ITM above.
    dtm = transferability.dtm
    main = select_pair(transferability, config.transfer).main
    with_main = transferability.agreement_by_name.get(main, {})
    dtm_scores = [dtm[name] for name in sources]
    agreement_scores = [with_main.get(name, math.nan) for name in sources]
    atlas_cases = index_atlases(Path(site_dir)) if with_atlases else ()
    if atlas_cases:
        rows += _atlas_labels(cases, atlas_cases, config, progress)
        sources += [f"{ATLAS_SOURCE_PREFIX}{k}" for k in range(1, len(atlas_cases) + 1)]
        dtm_scores += [math.nan] * len(atlas_cases)
        agreement_scores += [math.nan] * len(atlas_cases)
    return NoisyLabelSet(
        slices=slices,
        num_training_cases=len(training),
        sources=tuple(sources),
        labels=torch.stack(rows),
        itm_labels=itm_labels,
        dtm=tuple(dtm_scores),
        agreement=tuple(agreement_scores),
    )


def _fuse_majority(labels: npt.NDArray[np.int64], num_classes: int) -> torch.Tensor:
    if num_classes == 2:
        return torch.from_numpy(majority_vote(labels > 0).astype(np.int64))
    counts = np.stack([(labels == c).sum(0) for c in range(num_classes)])
    # Ties go to the lowest class (background first), as majority_vote's do.
    return torch.from_numpy(counts.argmax(0).astype(np.int64))


def _fuse_weighted(
    labels: npt.NDArray[np.int64], raw: npt.NDArray[np.float32], num_classes: int
) -> npt.NDArray[np.int64]:
    """Formula 6 on one slice; multi-class: argmax of the softmax-weighted votes."""
    if num_classes == 2:
        return weighted_vote(labels > 0, raw).astype(np.int64)
    weights = np.exp(raw - raw.max())
    weights /= weights.sum()
    votes = np.stack(
        [np.tensordot(weights, labels == c, axes=1) for c in range(num_classes)]
    )
    result: npt.NDArray[np.int64] = votes.argmax(0).astype(np.int64)
    return result


def _staple_per_case(
    noisy: NoisyLabelSet, num_classes: int
) -> tuple[torch.Tensor, npt.NDArray[np.float64]]:
    """STAPLE over each case's 3-D stacks; sensitivities ``(A, cases)`` (nan: none)."""
    labels = noisy.labels.numpy()
    fused = np.zeros(labels.shape[1:], dtype=np.int64)
    sensitivity = np.full((labels.shape[0], len(noisy.slices.case_ids)), math.nan)
    for case in range(len(noisy.slices.case_ids)):
        rows = (noisy.slices.case_of_slice == case).numpy()
        stack = labels[:, rows]
        if num_classes == 2:
            result = staple(stack > 0)
            fused[rows] = result.consensus.astype(np.int64)
            sensitivity[:, case] = result.sensitivity
        else:
            fused[rows] = multi_label_staple(stack)
    return torch.from_numpy(fused), sensitivity


def parameter_index(
    case_of_slice: torch.Tensor, num_sources: int, granularity: ConsensusGranularity
) -> torch.Tensor | None:
    """Map DeepSTAPLE's instances to data parameters; None: one per instance.

    The instances are source-major: instance ``a * M + m`` is source ``a``'s label of
    slice ``m`` of ``case_of_slice`` (``(M,)``, the trained slices' cases). With
    ``CASE`` granularity every slice of one (case, source) shares one parameter,
    numbered ``0..P-1`` in (source, case) order.

    Example:
        >>> parameter_index(torch.tensor([0, 0, 3]), 2, ConsensusGranularity.CASE)
        tensor([0, 0, 1, 2, 2, 3])
    """
    if granularity is ConsensusGranularity.SLICE:
        return None
    cases = case_of_slice.long()
    keys = torch.arange(num_sources).repeat_interleave(len(cases)) * (
        int(cases.max()) + 1
    ) + cases.repeat(num_sources)
    inverse: torch.Tensor = torch.unique(keys, return_inverse=True)[1]
    return inverse


def initial_data_parameters(
    scores: Sequence[float] | None, slices: int, index: torch.Tensor | None
) -> torch.Tensor | None:
    """The ``(P,)`` starting data parameters from per-source scores; None: flat.

    The instances are source-major (``a * slices + m``, as :func:`parameter_index`
    numbers them); every parameter of source ``a`` starts at
    ``prior_data_parameters(scores)[a]``.

    Example:
        >>> start = initial_data_parameters([0.75, 0.25], 2, None)
        >>> [round(float(value), 3) for value in start]
        [1.099, 1.099, -1.099, -1.099]
        >>> start = initial_data_parameters([0.75, 0.25], 2, torch.tensor([0, 0, 1, 1]))
        >>> [round(float(value), 3) for value in start]
        [1.099, -1.099]
    """
    if scores is None:
        return None
    per_instance = torch.from_numpy(prior_data_parameters(scores)).repeat_interleave(
        slices
    )
    if index is None:
        return per_instance
    table = torch.zeros(int(index.max()) + 1, dtype=per_instance.dtype)
    # Every instance of one parameter comes from one source, so they agree.
    return table.scatter(0, index.long(), per_instance)


def _learn_data_parameters(
    noisy: NoisyLabelSet, config: RunConfig, progress: Progress
) -> npt.NDArray[np.float32]:
    """DeepSTAPLE on the informative slices; ``(A, N)`` raw data parameters.

    With ``consensus.granularity = "case"`` the slices of one (case, source) share
    one parameter, repeated on each of them. With ``consensus.dp-prior`` other than
    ``"none"`` every parameter of a source starts at that source's
    :func:`core.consensus.deepstaple.prior_data_parameters` value.
    """
    settings = config.consensus
    sources, count = noisy.labels.shape[:2]
    informative = (noisy.labels != 0).flatten(2).any(2).any(0)  # (N,)
    rows = torch.nonzero(informative).flatten()
    result = np.full((sources, count), math.nan, dtype=np.float32)
    if len(rows) == 0:
        progress("[consensus] every noisy label is empty; nothing for DeepSTAPLE")
        return result
    images = noisy.slices.images[rows].repeat(sources, 1, 1, 1)
    labels = noisy.labels[:, rows].reshape(sources * len(rows), *noisy.labels.shape[2:])
    index = parameter_index(
        noisy.slices.case_of_slice[rows], sources, settings.granularity
    )
    initial = initial_data_parameters(
        noisy.prior_scores(settings.dp_prior), len(rows), index
    )
    if initial is not None:
        progress(
            f"[consensus] data parameters start from the {settings.dp_prior} prior: "
            + ", ".join(
                f"{name} {float(value):.2f}"
                for name, value in zip(
                    noisy.sources,
                    prior_data_parameters(noisy.prior_scores(settings.dp_prior) or ()),
                    strict=True,
                )
            )
        )
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, data=config.data)
    trained = train_deepstaple(
        images,
        labels,
        model=model,
        num_classes=config.data.num_classes,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        dp_learning_rate=settings.dp_learning_rate,
        out_of_line=settings.out_of_line,
        fixed_weighting=settings.fixed_weighting,
        risk_regularisation=settings.risk_regularisation,
        device=select_device(config.train.device),
        seed=config.train.seed,
        amp=config.train.amp,
        parameter_index=index,
        initial_data_parameters=initial,
        progress=progress,
    )
    result[:, rows.numpy()] = trained.data_parameters.reshape(sources, len(rows))
    return result


def _fuse_deepstaple(
    noisy: NoisyLabelSet, raw: npt.NDArray[np.float32], num_classes: int
) -> torch.Tensor:
    labels = noisy.labels.numpy()
    fused = np.zeros(labels.shape[1:], dtype=np.int64)
    for row in np.flatnonzero(~np.isnan(raw[0])):
        fused[row] = _fuse_weighted(labels[:, row], raw[:, row], num_classes)
    return torch.from_numpy(fused)


def _mean_over(values: npt.NDArray[np.floating]) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def write_consensus_labels(
    cases: Sequence[CaseRecord],
    slices: SliceSet,
    fused: Mapping[str, torch.Tensor],
    config: RunConfig,
    out_dir: Path,
) -> None:
    """Write each method's labels of ``cases`` as ``out_dir/<method>/<case>.nii.gz``.

    Labels are put back on each image's own grid (size, spacing, origin, direction),
    so they can train any other tool at the site (e.g. nnU-Net).
    """
    for number, case in enumerate(cases):
        rows = slices.case_of_slice == number
        image = read_volume(case.image_path)
        for method, labels in fused.items():
            volume = label_volume_from_slices(
                labels[rows],
                image.array.shape,
                data=config.data,
                tiling=None if slices.tilings is None else slices.tilings[number],
            )
            write_volume(
                dataclasses.replace(image, array=volume.astype(np.uint8)),
                out_dir / method / f"{case.case_id}.nii.gz",
            )


def run_consensus(
    site_dir: Path,
    candidates: Mapping[str, Arrays],
    config: RunConfig,
    *,
    label_sources: Sequence[str],
    start: str,
    labels_dir: Path | None,
    progress: Progress = quiet,
) -> ConsensusOutcome:
    """Build the noisy label set, fuse it four ways, train ``start`` on each fusion.

    Args:
        site_dir: the target site folder.
        candidates: weights by model name (the label sources and the start model).
        config: the run config (``consensus`` settings).
        label_sources: the candidates whose predictions are noisy labels.
        start: the candidate trained further on each consensus.
        labels_dir: where to write the training images' consensus labels; None
            writes nothing.
        progress: called with progress lines.

    Raises:
        ValueError: a named model was not sent, or weights do not fit.
        SiteDataError: the site's images (or atlases) are missing or bad.
        RegistrationError: an atlas could not be registered.
    """
    missing = sorted({start, *label_sources} - set(candidates))
    if missing:
        raise ValueError(
            f"models {missing} are named in the request but were not sent "
            f"(sent: {sorted(candidates)})"
        )
    started = time.perf_counter()
    num_classes = config.data.num_classes
    noisy = build_noisy_label_set(
        site_dir,
        {name: candidates[name] for name in label_sources},
        config,
        with_atlases=config.consensus.atlases,
        progress=progress,
    )
    labels_np = noisy.labels.numpy()
    progress(
        f"[consensus] {len(noisy.sources)} noisy labels per image "
        f"({', '.join(noisy.sources)}) on {len(noisy.slices)} slices"
    )
    raw = _learn_data_parameters(noisy, config, progress)
    staple_labels, sensitivity = _staple_per_case(noisy, num_classes)
    fused = {
        "itm": noisy.itm_labels,
        "majority": _fuse_majority(labels_np, num_classes),
        "staple": staple_labels,
        "deepstaple": _fuse_deepstaple(noisy, raw, num_classes),
    }
    assert tuple(fused) == CONSENSUS_METHODS

    index = index_site(Path(site_dir))
    training_cases = index.training_images
    training_rows = noisy.training_rows
    if labels_dir is not None:
        write_consensus_labels(
            training_cases,
            noisy.slices.subset_cases(range(len(training_cases))),
            {method: labels[training_rows] for method, labels in fused.items()},
            config,
            labels_dir,
        )
        progress(f"[consensus] consensus labels written to {labels_dir}")

    # Per source: mean data parameter and STAPLE sensitivity, agreement with DeepSTAPLE.
    informative = ~np.isnan(raw[0])
    data_parameter = {
        name: _mean_over(raw[a, informative]) for a, name in enumerate(noisy.sources)
    }
    staple_sensitivity = {
        name: _mean_over(sensitivity[a]) for a, name in enumerate(noisy.sources)
    }
    agreement = {
        name: dice_score(noisy.labels[a], fused["deepstaple"], num_classes=num_classes)
        for a, name in enumerate(noisy.sources)
    }

    scored = _score_on_evaluation_labels(
        index.evaluation_images, noisy, fused, raw, sensitivity, config
    )
    methods = CONSENSUS_METHODS if config.consensus.baselines else ("deepstaple",)
    models = _train_on_each(noisy, fused, methods, candidates[start], config, progress)
    return ConsensusOutcome(
        models=models,
        fused=fused,
        data_parameters=raw,
        labels_dir=labels_dir,
        num_images=len(noisy.slices.case_ids),
        num_labels=int(informative.sum()) * len(noisy.sources),
        num_atlases=sum(s.startswith(ATLAS_SOURCE_PREFIX) for s in noisy.sources),
        seconds=time.perf_counter() - started,
        data_parameter=data_parameter,
        staple_sensitivity=staple_sensitivity,
        agreement=agreement,
        label_dice=scored.label_dice,
        spearman_dp=scored.spearman_dp,
        spearman_staple=scored.spearman_staple,
        auroc_dp=scored.auroc_dp,
        auroc_staple=scored.auroc_staple,
    )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class _EvaluationScores:
    """What the evaluation labels say of each consensus and of the label weights.

    ``auroc_*``: per labelled evaluation case, the AUROC of each source's data
    parameter (mean over the case's slices) or STAPLE sensitivity separating the
    sources whose label has true Dice >= :data:`GOOD_LABEL_DICE` on the case from the
    others (cases with only one kind are left out), averaged over cases.
    """

    label_dice: dict[str, float]
    spearman_dp: float = math.nan
    spearman_staple: float = math.nan
    auroc_dp: float = math.nan
    auroc_staple: float = math.nan


def _score_on_evaluation_labels(
    evaluation_images: Sequence[CaseRecord],
    noisy: NoisyLabelSet,
    fused: Mapping[str, torch.Tensor],
    raw: npt.NDArray[np.float32],
    sensitivity: npt.NDArray[np.float64],
    config: RunConfig,
) -> _EvaluationScores:
    """Consensus Dice per method and the label-quality figures, on evaluation images.

    ``evaluation_images`` are every evaluation image, in the order the noisy label set
    holds them after the training images; only those with a label are scored. The
    evaluation labels are read here only, to score; nothing trains on them. Returns
    empty Dice and nan figures when the site has no evaluation labels.
    """
    labelled = [
        (number, case)
        for number, case in enumerate(evaluation_images, start=noisy.num_training_cases)
        if case.label_path is not None
    ]
    if not labelled:
        return _EvaluationScores(label_dice={})
    num_classes = config.data.num_classes
    truth = build_slice_set(
        [case for _, case in labelled], data=config.data, with_labels=True
    ).labels
    assert truth is not None
    case_of_slice = noisy.slices.case_of_slice.numpy()
    # The labelled evaluation cases' slices, in the noisy set and in ``truth`` (the
    # same slices of the same cases, in the same order).
    rows_of = {
        number: np.flatnonzero(case_of_slice == number) for number, _ in labelled
    }
    truth_rows_of, start = {}, 0
    for number, rows in rows_of.items():
        truth_rows_of[number] = np.arange(start, start + len(rows))
        start += len(rows)
    assert start == len(truth)
    label_dice = {
        method: float(
            np.mean(
                [
                    dice_score(
                        labels[rows],
                        truth[truth_rows_of[case]],
                        num_classes=num_classes,
                    )
                    for case, rows in rows_of.items()
                ]
            )
        )
        for method, labels in fused.items()
    }
    dps: list[float] = []
    sensitivities: list[float] = []
    true_dice: list[float] = []
    auroc_dp: list[float] = []
    auroc_staple: list[float] = []
    for case, rows in rows_of.items():
        first = len(true_dice)
        for a in range(len(noisy.sources)):
            true_dice.append(
                dice_score(
                    noisy.labels[a][rows],
                    truth[truth_rows_of[case]],
                    num_classes=num_classes,
                )
            )
            dps.append(_mean_over(raw[a, rows]))
            sensitivities.append(float(sensitivity[a, case]))
        good = [dice >= GOOD_LABEL_DICE for dice in true_dice[first:]]
        auroc_dp.append(auroc(dps[first:], good))
        auroc_staple.append(auroc(sensitivities[first:], good))
    return _EvaluationScores(
        label_dice=label_dice,
        spearman_dp=spearman(dps, true_dice, min_pairs=_SPEARMAN_MIN_PAIRS),
        spearman_staple=spearman(
            sensitivities, true_dice, min_pairs=_SPEARMAN_MIN_PAIRS
        ),
        auroc_dp=_mean_over(np.asarray(auroc_dp)),
        auroc_staple=_mean_over(np.asarray(auroc_staple)),
    )


def _train_on_each(
    noisy: NoisyLabelSet,
    fused: Mapping[str, torch.Tensor],
    methods: Sequence[str],
    start_weights: Arrays,
    config: RunConfig,
    progress: Progress,
) -> dict[str, Arrays]:
    """Train the start model on the training images with each method's labels."""
    rows = noisy.training_rows
    images = noisy.slices.images[rows]
    recipe = dataclasses.replace(
        config.train,
        epochs=config.consensus.refine_epochs,
        learning_rate=config.consensus.refine_learning_rate,
    )
    device = select_device(config.train.device)
    models = {}
    for method in methods:
        model = build_model_with("start", start_weights, config)
        result = train_supervised(
            model,
            images,
            fused[method][rows],
            train=recipe,
            device=device,
            label=f"consensus {method}",
            progress=progress,
        )
        models[method] = get_weights(model)
        progress(
            f"[consensus] trained on {method} labels: loss {result.final_loss:.4f}"
        )
    return models
