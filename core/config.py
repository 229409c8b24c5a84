"""Typed run configuration: one frozen object parsed once from Flower's flat mapping.

Owns the dataclasses for every config group and the parser that turns
``context.run_config`` (flat, dotted kebab-case keys such as ``"train.epochs"``) into a
validated :class:`RunConfig`. Defaults live only in ``pyproject.toml``
``[tool.flwr.app.config]``; the dataclasses have none, so there is one place to look.
Plain Python: never imports flwr.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import tomllib
import typing
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from core.coerce import as_bool, as_float, as_int, as_str
from core.logs import LogLevel

ConfigValue = bool | int | float | str

PYPROJECT: Final = Path(__file__).resolve().parent.parent / "pyproject.toml"


class Norm(StrEnum):
    """Normalisation layers of the U-Net (Opacus needs ``instance`` or ``group``)."""

    INSTANCE = "instance"
    BATCH = "batch"
    GROUP = "group"


class SliceAxis(StrEnum):
    """Image axis along which 3-D volumes are cut into 2-D slices."""

    X = "x"
    Y = "y"
    Z = "z"


class TransferMetric(StrEnum):
    """Score ranking source models on the target (LFTM, or the entropy baseline)."""

    LFTM = "lftm"
    ENTROPY = "entropy"


class LandmarkRule(StrEnum):
    """Where a SeqTran transfer path may start (``affinity.landmarks``)."""

    CASE_FRACTION = "case-fraction"  # sources with enough labelled cases, any hops
    COMMUNITIES = "communities"  # the paper: Girvan-Newman communities' landmarks


class SelectionRule(StrEnum):
    """How TGMA picks its main/auxiliary pair and pseudo-label voters from the scores.

    ``DTM``: the paper: main and aux are the two best DTM, every candidate votes in the
    pseudo-labels. ``AGREEMENT``: SiteBridge's departure
    (docs/methods.md#agreement-selection): DTM confirmed by the best agreement with
    another candidate, and only candidates that agree with the main may be aux or vote.
    """

    DTM = "dtm"
    AGREEMENT = "agreement"


class LargestComponent(StrEnum):
    """Whether a source decides to keep the largest connected component per class.

    ``AUTO``: each source site decides on its own labelled evaluation cases, on only
    when it strictly raises their mean Dice (nnU-Net's rule,
    docs/methods.md#post-processing). ``OFF``: never post-processed.
    """

    AUTO = "auto"
    OFF = "off"


class ConsensusSources(StrEnum):
    """Which candidates label the target's images for consensus.

    ``LABEL_FREE``: only the candidates that never saw a target label, so the
    consensus is label-free unless atlases join; ``ALL``: the few-label ones too
    (the SeqTran model fine-tuned at the target), which makes it few-label.
    """

    LABEL_FREE = "label-free"
    ALL = "all"


class ConsensusGranularity(StrEnum):
    """Which noisy-label instances share one DeepSTAPLE data parameter.

    ``SLICE``: one per (2-D slice, label source), SiteBridge's first form for 2-D
    networks. ``CASE``: the paper's volume granularity, one per (case, label source)
    shared by all the case's slices (docs/methods.md#data-parameters).
    """

    SLICE = "slice"
    CASE = "case"


class ConsensusPrior(StrEnum):
    """Where DeepSTAPLE's data parameters start (docs/methods.md#data-parameters).

    ``NONE``: every one at 0.0, the paper's flat start. ``DTM``: each label source's
    parameters start at its centred, scaled log-odds DTM on the target;
    ``AGREEMENT``: the same form of its agreement (mean Dice of predictions) with
    TGMA's main. Both are computed from the target's unlabelled images only; atlas
    sources, which have neither, start at the centre (0.0).
    """

    NONE = "none"
    DTM = "dtm"
    AGREEMENT = "agreement"


class SyntheticShift(StrEnum):
    """How far apart the built-in synthetic federation's sites are.

    ``WIDE``: spread over the whole continuum, past the contrast inversion (most
    sources fail at most targets). ``MILD``: every site on the near half, before the
    inversion, each with its own scanner (noise, bias field, blur, resolution): every
    source is decent and averaging them is a strong baseline.
    """

    WIDE = "wide"
    MILD = "mild"


class Resample(StrEnum):
    """How a slice becomes network input (docs/planning.md#patches-and-sliding-windows).

    ``slice`` resizes each whole slice to ``data.image-size`` pixels; ``spacing``
    resamples it to ``data.spacing-mm`` and cuts it into ``data.image-size`` tiles on
    a sliding-window grid, put back together for every prediction.
    """

    SLICE = "slice"
    SPACING = "spacing"


class IntensityNormalisation(StrEnum):
    """How a site's image intensities become network inputs (docs/planning.md).

    ``auto`` follows the resolution plan per modality, as nnU-Net does: a site whose
    ``dataset.json`` modality is CT is clipped to the plan's foreground window and
    scaled by its mean and standard deviation (``data.ct-window``), every other site
    is z-scored per volume. ``zscore`` z-scores every volume; ``ct`` applies
    ``data.ct-window`` at every site.
    """

    AUTO = "auto"
    ZSCORE = "zscore"
    CT = "ct"


class SyntheticScale(StrEnum):
    """What the built-in synthetic federation's volumes look like.

    ``SMALL``: 10 x 64 x 64 voxels at 1.5 x 1.5 x 3 mm, every site alike, MR-like
    (the federation the benchmarks were measured on). ``HOSPITAL``: hospital-sized,
    anisotropic volumes whose size and spacing each site draws from the federation
    seed, MR-like sites and one CT-like site in Hounsfield units, the anatomy sized in
    millimetres (docs/development.md#the-hospital-scale-federation).
    """

    SMALL = "small"
    HOSPITAL = "hospital"


class Attention(StrEnum):
    """Attention map behind the LFTM keep-mask."""

    PROBABILITY = "probability"
    GRADCAM = "gradcam"


# The coordinator's phases in run order (server/runner.py runs them). ``last-phase``
# names one of these; a resumed run skips those already persisted.
PIPELINE_PHASES: Final = (
    "discover",
    "plan",
    "source-training",
    "affinity",
    "transferability",
    "adaptation",
    "consensus",
    "semisup",
    "evaluation",
)


def _require(condition: bool, key: str, rule: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{key} must be {rule}, got {value!r}")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class FederationConfig:
    """Which federation to run on and how tolerant phases are to missing sites."""

    dir: str
    target_site: str
    cache_dir: str
    synthetic_seed: int
    synthetic_sites: int
    synthetic_cases: int
    # Labelled training cases the built-in federation's target keeps (the rest are
    # unlabelled images); >= synthetic_cases keeps them all.
    synthetic_target_labelled: int
    synthetic_shift: SyntheticShift
    synthetic_scale: SyntheticScale
    min_sites: int
    expected_sites: int  # 0 = count the site folders when the coordinator sees them
    wait_nodes_s: float
    reply_timeout_s: float

    def __post_init__(self) -> None:
        _require(
            self.synthetic_sites >= 3,
            "federation.synthetic-sites",
            ">= 3",
            self.synthetic_sites,
        )
        _require(
            self.synthetic_cases >= 2,
            "federation.synthetic-cases",
            ">= 2",
            self.synthetic_cases,
        )
        _require(
            self.synthetic_target_labelled >= 0,
            "federation.synthetic-target-labelled",
            ">= 0",
            self.synthetic_target_labelled,
        )
        _require(self.min_sites >= 1, "federation.min-sites", ">= 1", self.min_sites)
        _require(
            self.expected_sites >= 0,
            "federation.expected-sites",
            ">= 0",
            self.expected_sites,
        )
        _require(
            self.wait_nodes_s > 0, "federation.wait-nodes-s", "> 0", self.wait_nodes_s
        )
        _require(
            self.reply_timeout_s > 0,
            "federation.reply-timeout-s",
            "> 0",
            self.reply_timeout_s,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PipelineConfig:
    """Which phases run: stop early, or resume an interrupted run.

    Its keys are top-level in the run config (``resume-run``, ``last-phase``).
    """

    resume_run: str  # a run id under output.runs-dir; "" = a new run
    last_phase: str  # "" = every phase

    def __post_init__(self) -> None:
        _require(
            self.last_phase in ("", *PIPELINE_PHASES),
            "last-phase",
            f"empty or one of {', '.join(PIPELINE_PHASES)}",
            self.last_phase,
        )
        _require(
            self.resume_run == "" or self.resume_run.isdigit(),
            "resume-run",
            "empty or a run id (digits, the folder name under output.runs-dir)",
            self.resume_run,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class OutputConfig:
    """Where the coordinator writes runs, and which progress lines the apps show."""

    runs_dir: str
    log_level: LogLevel  # the ServerApp's and (in simulation) the ClientApp's
    # The predictor whose segmentations the target writes at home ("" = none).
    target_segmentations: str


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig:
    """How site volumes become network inputs."""

    image_size: int  # 0 = the resolution plan's (docs/planning.md)
    slice_axis: SliceAxis
    num_classes: int
    max_slices_per_case: int
    normalisation: IntensityNormalisation
    # CT window: clip low, clip high, mean, standard deviation (HU); () = the plan's.
    ct_window: tuple[float, ...]
    resample: Resample
    spacing_mm: float  # in-plane target spacing of ``resample = "spacing"``; 0 = plan's

    def __post_init__(self) -> None:
        _require(
            self.image_size == 0
            or (self.image_size >= 16 and self.image_size % 8 == 0),
            "data.image-size",
            "0 (from the plan) or a multiple of 8, >= 16",
            self.image_size,
        )
        _require(
            math.isfinite(self.spacing_mm) and self.spacing_mm >= 0,
            "data.spacing-mm",
            ">= 0 (0 = the plan's target spacing)",
            self.spacing_mm,
        )
        _require(
            self.ct_window == ()
            or (
                len(self.ct_window) == 4
                and all(math.isfinite(value) for value in self.ct_window)
                and self.ct_window[0] < self.ct_window[1]
                and self.ct_window[3] > 0
            ),
            "data.ct-window",
            "empty (from the plan) or four finite numbers 'clip-low,clip-high,mean,sd'"
            " with clip-low < clip-high and sd > 0",
            ",".join(f"{value:g}" for value in self.ct_window),
        )
        _require(self.num_classes >= 2, "data.num-classes", ">= 2", self.num_classes)
        _require(
            self.max_slices_per_case >= 0,
            "data.max-slices-per-case",
            ">= 0",
            self.max_slices_per_case,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PlanConfig:
    """The resolution plan derived from the sites' fingerprints (docs/planning.md)."""

    enabled: bool  # ask the sites for fingerprints and derive the plan
    max_image_size: int  # the largest in-plane size the plan may choose
    pixels_per_batch: int  # the plan's batch holds at most this many pixels

    def __post_init__(self) -> None:
        _require(
            self.max_image_size >= 16 and self.max_image_size % 8 == 0,
            "plan.max-image-size",
            "a multiple of 8, >= 16",
            self.max_image_size,
        )
        _require(
            self.pixels_per_batch >= 2 * 16 * 16,
            "plan.pixels-per-batch",
            ">= 512 (two 16 x 16 slices)",
            self.pixels_per_batch,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """MONAI U-Net architecture."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    norm: Norm
    dropout: float

    def __post_init__(self) -> None:
        _require(
            len(self.channels) >= 2,
            "model.channels",
            "at least two values",
            self.channels,
        )
        _require(
            len(self.strides) == len(self.channels) - 1,
            "model.strides",
            f"{len(self.channels) - 1} values (one fewer than model.channels)",
            self.strides,
        )
        _require(
            all(c > 0 for c in self.channels),
            "model.channels",
            "positive",
            self.channels,
        )
        _require(
            self.num_res_units >= 0, "model.num-res-units", ">= 0", self.num_res_units
        )
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "in [0, 1)", self.dropout)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TrainConfig:
    """Supervised training of source models (and the target-supervised oracle)."""

    epochs: int
    batch_size: int
    learning_rate: float
    seed: int
    device: str
    amp: bool
    augment: bool

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", ">= 1", self.epochs)
        _require(
            self.batch_size >= 0,
            "train.batch-size",
            ">= 0 (0 = from the plan)",
            self.batch_size,
        )
        _require(
            self.learning_rate > 0, "train.learning-rate", "> 0", self.learning_rate
        )
        _require(
            self.device in ("auto", "cpu", "cuda")
            or re.fullmatch(r"cuda:\d+", self.device) is not None,
            "train.device",
            "'auto', 'cpu', 'cuda' or 'cuda:N'",
            self.device,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TransferConfig:
    """LFTM and source selection (docs/methods.md#tgma)."""

    metric: TransferMetric
    attention: Attention
    smoothing_sigma_px: float
    threshold: float
    dilation_fraction: float
    selection: SelectionRule
    agreement_threshold: float  # least agreement with the main to be aux or vote
    # With at least this many voters TGMA predicts by their uniform average (0: never).
    ensemble_min_voters: int

    def __post_init__(self) -> None:
        _require(
            self.ensemble_min_voters == 0 or self.ensemble_min_voters >= 2,
            "transfer.ensemble-min-voters",
            "0 (never) or >= 2",
            self.ensemble_min_voters,
        )
        _require(
            0.0 <= self.agreement_threshold <= 1.0,
            "transfer.agreement-threshold",
            "in [0, 1]",
            self.agreement_threshold,
        )
        _require(
            self.smoothing_sigma_px >= 0,
            "transfer.smoothing-sigma-px",
            ">= 0",
            self.smoothing_sigma_px,
        )
        _require(
            0.0 < self.threshold < 1.0,
            "transfer.threshold",
            "in (0, 1)",
            self.threshold,
        )
        _require(
            0.0 <= self.dilation_fraction < 0.5,
            "transfer.dilation-fraction",
            "in [0, 0.5)",
            self.dilation_fraction,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AdaptConfig:
    """TGMA target optimisation of the main/auxiliary pair."""

    epochs: int
    batch_size: int
    learning_rate: float

    def __post_init__(self) -> None:
        _require(self.epochs >= 0, "adapt.epochs", ">= 0", self.epochs)
        _require(self.batch_size >= 1, "adapt.batch-size", ">= 1", self.batch_size)
        _require(
            self.learning_rate > 0, "adapt.learning-rate", "> 0", self.learning_rate
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ConsensusConfig:
    """Label consensus at the target (docs/methods.md#deepstaple).

    ``epochs``..``risk_regularisation`` drive DeepSTAPLE's own network and data
    parameters; ``refine_*`` train the target model on each consensus.
    """

    enabled: bool
    epochs: int
    batch_size: int
    learning_rate: float  # AdamW, the DeepSTAPLE network
    dp_learning_rate: float  # SparseAdam, the data parameters
    out_of_line: bool
    fixed_weighting: bool
    risk_regularisation: bool
    granularity: ConsensusGranularity  # which label instances share a data parameter
    dp_prior: ConsensusPrior  # where the data parameters start
    label_sources: ConsensusSources  # which candidates' predictions are labels
    atlases: bool  # add labels registered from the target's atlases/ folder
    baselines: bool  # also train on TGMA pseudo-labels, majority vote and STAPLE
    refine_epochs: int
    refine_learning_rate: float

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "consensus.epochs", ">= 1", self.epochs)
        _require(self.batch_size >= 1, "consensus.batch-size", ">= 1", self.batch_size)
        for key, value in (
            ("consensus.learning-rate", self.learning_rate),
            ("consensus.dp-learning-rate", self.dp_learning_rate),
            ("consensus.refine-learning-rate", self.refine_learning_rate),
        ):
            _require(math.isfinite(value) and value > 0, key, "> 0", value)
        _require(
            self.refine_epochs >= 1,
            "consensus.refine-epochs",
            ">= 1",
            self.refine_epochs,
        )


class SemisupVariant(StrEnum):
    """What the semi-supervised rounds optimise (docs/methods.md#ug-mcl; baselines).

    ``SUPERVISED``: the labelled part only, ``0.5 * (CE + Dice(softmax))``; no teacher.
    ``MEAN_TEACHER``: plus unmasked intra-task consistency; no SDF terms.
    ``UGMCL``: dual-task supervised loss, uncertainty-masked intra-task consistency and
    cross-task consistency (the full method).
    """

    SUPERVISED = "supervised"
    MEAN_TEACHER = "mean-teacher"
    UGMCL = "ugmcl"


class ClipScope(StrEnum):
    """What ``semisup.max-grad-norm`` bounds (docs/methods.md#federated-options).

    ``MODEL``: one L2 norm over every parameter with a gradient (the default).
    ``PARTS``: the segmentation network's and the distance head's gradients each on
    their own, so the segmentation network is held to the bound the baselines' whole
    update is (a baseline's distance head has no gradient: the same as ``MODEL``).
    """

    MODEL = "model"
    PARTS = "parts"


class SemisupTeacher(StrEnum):
    """Where a site's federated UG-MCL teacher comes from each round.

    ``LOCAL``: the site keeps its own EMA teacher in its node state across the rounds
    (the default). ``GLOBAL``: the teacher restarts from the averaged student at the
    start of every round (docs/methods.md#federated-options).
    """

    LOCAL = "local"
    GLOBAL = "global"


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SemisupConfig:
    """UG-MCL rounds: refinement at the target and FedAvg rounds across sites.

    ``iterations`` steps refine the adapted model at the target (when it has labels);
    ``rounds`` FedAvg rounds of ``local_iterations`` steps each train the student
    across ``sites``. ``labelled_fraction`` keeps only that share of each site's
    labelled cases as labelled (the rest count as unlabelled), to emulate sites that
    can label only a few cases.
    """

    enabled: bool
    variant: SemisupVariant
    target: bool  # refine the adapted model at the target when it has labels
    iterations: int  # steps of the target refinement
    rounds: int  # federated rounds; 0 = no federated rounds
    local_iterations: int  # steps per site per round
    sites: tuple[str, ...]  # () = every site with labelled cases
    labelled_fraction: float
    labelled_batch: int
    unlabelled_batch: int
    learning_rate: float  # SGD, momentum 0.9, weight decay 1e-4 (docs/methods.md)
    ema_decay: float
    passes: int  # teacher passes for the uncertainty
    consistency: float  # weight of both consistency terms after the ramp
    consistency_rampup: int  # steps; 0 = the whole schedule
    sdf_k: float  # steepness of sigmoid(-k * SDF)
    sdf_weight: float  # optional SDF regression on labelled data; 0 = off
    masked_cross: bool  # uncertainty-mask the cross-task term too
    max_grad_norm: float  # clip each update's gradient (L2); 0 = off
    clip_scope: ClipScope  # model: one norm over the student | parts: per network part
    shared_head: bool  # SDF = tanh(segmentation logits), the BraTS code's variant
    dropout: float  # on the bottleneck and the heads' input (Monte-Carlo passes)
    distance_consistency: bool  # student-teacher term on the distance branch too
    teacher: SemisupTeacher  # local: kept per site; global: restarted every round
    local_norm: bool  # FedBN: norm layers' affine parameters stay at each site

    def __post_init__(self) -> None:
        for key, value, lowest in (
            ("semisup.iterations", self.iterations, 1),
            ("semisup.rounds", self.rounds, 0),
            ("semisup.local-iterations", self.local_iterations, 1),
            ("semisup.labelled-batch", self.labelled_batch, 1),
            ("semisup.unlabelled-batch", self.unlabelled_batch, 0),
            ("semisup.passes", self.passes, 1),
            ("semisup.consistency-rampup", self.consistency_rampup, 0),
        ):
            _require(value >= lowest, key, f">= {lowest}", value)
        _require(
            0.0 < self.labelled_fraction <= 1.0,
            "semisup.labelled-fraction",
            "in (0, 1]",
            self.labelled_fraction,
        )
        _require(
            math.isfinite(self.learning_rate) and self.learning_rate > 0,
            "semisup.learning-rate",
            "> 0",
            self.learning_rate,
        )
        _require(
            0.0 <= self.ema_decay < 1.0,
            "semisup.ema-decay",
            "in [0, 1)",
            self.ema_decay,
        )
        for weight_key, weight in (
            ("semisup.consistency", self.consistency),
            ("semisup.sdf-weight", self.sdf_weight),
            ("semisup.max-grad-norm", self.max_grad_norm),
        ):
            _require(math.isfinite(weight) and weight >= 0, weight_key, ">= 0", weight)
        _require(self.sdf_k > 0, "semisup.sdf-k", "> 0", self.sdf_k)
        _require(
            0.0 <= self.dropout < 1.0, "semisup.dropout", "in [0, 1)", self.dropout
        )
        _require(
            all(self.sites) and len(set(self.sites)) == len(self.sites),
            "semisup.sites",
            "empty or distinct comma-separated site names",
            ",".join(self.sites),
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class AffinityConfig:
    """Task profiles, affinities and transfer paths (docs/methods.md#seqtran).

    ``enabled`` runs the pipeline's ``affinity`` phase (profiles, path, sequential
    fine-tuning; its model joins the TGMA candidates). ``image_size``..
    ``foreground_quantiles`` say how every site computes its task profile;
    ``image_weight`` (a), ``label_weight`` (b) and ``polarity_weight`` (c) weigh the
    normalised distance d = a * H + b * (1 - R) + c * P (``python -m
    simulations.benchmark affinity --calibrate`` fits them; c = 0 is the paper's
    form, and only with c > 0 do sites compute and release the polarity term of
    ``polarity_quantiles`` foreground and shell intensity quantiles, the shell
    ``polarity_shell`` voxels wide, docs/methods.md#polarity-term);
    ``min_hops``..``max_hops`` bound a transfer path's length (the paper's path has
    exactly 2: one intermediate); ``landmarks`` says where a path
    may start: ``case-fraction``, a source with at least ``start_case_fraction`` of the
    best-labelled source's cases, or ``communities``, the landmark of one of
    ``communities`` Girvan-Newman communities with an intermediate of the same
    community (the paper's exact 2-hop search, docs/methods.md#path-search);
    ``one_factor_edges`` drops every transfer step between sites whose modality and
    labels both differ (docs/methods.md#path-search); each fine-tuning step along the
    path trains ``finetune_epochs`` epochs at ``finetune_learning_rate``.
    """

    enabled: bool
    image_size: int  # S: every image is resized to an S^3 cube
    pca_variance: float  # explained variance the per-image PCA keeps
    quantiles: int  # K: midpoint quantiles of the image term
    quantile_clip: float  # image quantiles are clipped to [-clip, clip] (z-score units)
    label_grid: int  # G: side of the mean foreground map
    foreground_quantiles: (
        int  # midpoint quantiles of the labelled cases' foreground fractions
    )
    image_weight: float  # a
    label_weight: float  # b
    polarity_weight: float  # c: the polarity term (0 = the paper's two terms)
    polarity_quantiles: int  # K_p: intensity quantiles inside the foreground and shell
    polarity_shell: int  # in-plane width of the shell around the foreground (voxels)
    min_hops: int
    max_hops: int
    start_case_fraction: float
    landmarks: LandmarkRule
    communities: int
    one_factor_edges: bool
    finetune_epochs: int
    finetune_learning_rate: float

    def __post_init__(self) -> None:
        for key, value in (
            ("affinity.image-size", self.image_size),
            ("affinity.quantiles", self.quantiles),
            ("affinity.label-grid", self.label_grid),
        ):
            _require(value >= 2, key, ">= 2", value)
        _require(
            self.foreground_quantiles >= 1,
            "affinity.foreground-quantiles",
            ">= 1",
            self.foreground_quantiles,
        )
        _require(
            0.0 < self.pca_variance <= 1.0,
            "affinity.pca-variance",
            "in (0, 1]",
            self.pca_variance,
        )
        _require(
            math.isfinite(self.quantile_clip) and self.quantile_clip > 0,
            "affinity.quantile-clip",
            "> 0",
            self.quantile_clip,
        )
        for weight_key, weight in (
            ("affinity.image-weight", self.image_weight),
            ("affinity.label-weight", self.label_weight),
            ("affinity.polarity-weight", self.polarity_weight),
        ):
            _require(math.isfinite(weight) and weight >= 0, weight_key, ">= 0", weight)
        for key, value in (
            ("affinity.polarity-quantiles", self.polarity_quantiles),
            ("affinity.polarity-shell", self.polarity_shell),
        ):
            _require(value >= 1, key, ">= 1", value)
        _require(
            self.image_weight + self.label_weight > 0,
            "affinity.image-weight",
            "positive when affinity.label-weight is 0",
            self.image_weight,
        )
        _require(self.min_hops >= 1, "affinity.min-hops", ">= 1", self.min_hops)
        _require(
            0.0 <= self.start_case_fraction <= 1.0,
            "affinity.start-case-fraction",
            "in [0, 1]",
            self.start_case_fraction,
        )
        _require(
            self.max_hops >= self.min_hops,
            "affinity.max-hops",
            f">= affinity.min-hops ({self.min_hops})",
            self.max_hops,
        )
        _require(
            self.communities >= 1, "affinity.communities", ">= 1", self.communities
        )
        if self.landmarks is LandmarkRule.COMMUNITIES:
            # The community search is the paper's landmark -> intermediate -> target.
            _require(
                self.min_hops <= 2,
                "affinity.min-hops",
                "<= 2 when affinity.landmarks is 'communities' (its paths have "
                "exactly 2 hops)",
                self.min_hops,
            )
            _require(
                self.max_hops >= 2,
                "affinity.max-hops",
                ">= 2 when affinity.landmarks is 'communities' (its paths have "
                "exactly 2 hops)",
                self.max_hops,
            )
        _require(
            self.finetune_epochs >= 1,
            "affinity.finetune-epochs",
            ">= 1",
            self.finetune_epochs,
        )
        _require(
            math.isfinite(self.finetune_learning_rate)
            and self.finetune_learning_rate > 0,
            "affinity.finetune-learning-rate",
            "> 0",
            self.finetune_learning_rate,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PrivacyConfig:
    """What the run asks for privacy; each site's policy may ask for more.

    A value of 0 means "not set by the run": the site policy's value applies alone.
    Where both set a value, the stricter wins at the site (``core.privacy.policy``).
    """

    dp: bool  # train on labelled site data with DP-SGD
    noise_multiplier: float
    target_epsilon: float  # per training, at ``delta``
    delta: float
    max_grad_norm: float  # per-sample clipping norm of DP-SGD
    max_reply_mb: float

    def __post_init__(self) -> None:
        for key, value in (
            ("privacy.noise-multiplier", self.noise_multiplier),
            ("privacy.target-epsilon", self.target_epsilon),
            ("privacy.max-reply-mb", self.max_reply_mb),
        ):
            _require(
                math.isfinite(value) and value >= 0, key, ">= 0 (0 = unset)", value
            )
        _require(0.0 < self.delta < 1.0, "privacy.delta", "in (0, 1)", self.delta)
        _require(
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0,
            "privacy.max-grad-norm",
            "> 0",
            self.max_grad_norm,
        )


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class PostprocessConfig:
    """Post-processing of the predictions (docs/methods.md#post-processing)."""

    largest_component: LargestComponent


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """The whole resolved run configuration."""

    pipeline: PipelineConfig
    federation: FederationConfig
    output: OutputConfig
    data: DataConfig
    plan: PlanConfig
    model: ModelConfig
    train: TrainConfig
    transfer: TransferConfig
    adapt: AdaptConfig
    consensus: ConsensusConfig
    semisup: SemisupConfig
    affinity: AffinityConfig
    postprocess: PostprocessConfig
    privacy: PrivacyConfig

    def __post_init__(self) -> None:
        downsampling = math.prod(self.model.strides)
        _require(
            self.data.image_size % downsampling == 0,
            "data.image-size",
            f"divisible by the product of model.strides ({downsampling})",
            self.data.image_size,
        )


def _group_types() -> dict[str, type]:
    hints = typing.get_type_hints(RunConfig)
    return {field.name: hints[field.name] for field in dataclasses.fields(RunConfig)}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


# Groups whose keys sit at the top level of the run config, without a group prefix.
_TOP_LEVEL_GROUPS: Final = frozenset({"pipeline"})


def _flat_key(group_name: str, field_name: str) -> str:
    if group_name in _TOP_LEVEL_GROUPS:
        return _kebab(field_name)
    return f"{_kebab(group_name)}.{_kebab(field_name)}"


# The typed check of each scalar annotation (errors name the key).
_COERCE: Final[dict[object, Callable[[object, str], object]]] = {
    bool: as_bool,
    int: as_int,
    float: as_float,
    str: as_str,
}


def _parse_value(key: str, raw: ConfigValue, annotation: Any) -> object:
    """Convert one flat value to the field's declared type, naming ``key`` on error."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        text = str(raw)
        if typing.get_args(annotation)[0] is str:
            return tuple(part.strip() for part in text.split(",") if part.strip())
        if typing.get_args(annotation)[0] is float:
            try:
                return tuple(float(part) for part in text.split(",") if part.strip())
            except ValueError:
                raise ValueError(
                    f"{key} must be comma-separated numbers, got {raw!r}"
                ) from None
        try:
            return tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            raise ValueError(
                f"{key} must be comma-separated integers, got {raw!r}"
            ) from None
    if isinstance(annotation, type) and issubclass(annotation, StrEnum):
        allowed = ", ".join(repr(member.value) for member in annotation)
        try:
            return annotation(str(raw))
        except ValueError:
            raise ValueError(f"{key} must be one of {allowed}, got {raw!r}") from None
    coerce = _COERCE.get(annotation)
    if coerce is not None:
        return coerce(raw, key)
    raise TypeError(
        f"unsupported config type {annotation!r} for {key}"
    )  # pragma: no cover


def load_run_config(flat: Mapping[str, ConfigValue]) -> RunConfig:
    """Parse Flower's flat run config into a validated :class:`RunConfig`.

    A site parses its run config several times per message (the lifespan, the
    egress guard, the handler); the same flat mapping gives the same frozen config,
    so the last few parses are kept (reading the groups' type hints is the slow
    part: about 10 ms a parse).

    Args:
        flat: dotted kebab-case keys to scalar values, e.g. ``context.run_config``.

    Returns:
        The frozen, typed configuration.

    Raises:
        ValueError: on a missing or unknown key, or a value of the wrong type or range;
            the message names the TOML key.
    """
    # True == 1 == 1.0 in a hash key, but not as a run-config value (train.epochs =
    # true is an error): each value's type is part of the key.
    try:
        items = tuple(
            sorted(
                (str(key), type(value).__name__, value) for key, value in flat.items()
            )
        )
        hash(items)
    except TypeError:
        return _parse_run_config(flat)
    return _parse_run_config_cached(items)


@functools.lru_cache(maxsize=8)
def _parse_run_config_cached(
    items: tuple[tuple[str, str, ConfigValue], ...],
) -> RunConfig:
    return _parse_run_config({key: value for key, _, value in items})


def _parse_run_config(flat: Mapping[str, ConfigValue]) -> RunConfig:
    groups: dict[str, object] = {}
    known: set[str] = set()
    for group_name, group_type in _group_types().items():
        hints = typing.get_type_hints(group_type)
        values: dict[str, object] = {}
        for field in dataclasses.fields(group_type):
            key = _flat_key(group_name, field.name)
            known.add(key)
            if key not in flat:
                raise ValueError(f"{key} is missing from the run config")
            raw = flat[key]
            if key == "resume-run" and type(raw) is int:
                raw = str(raw)  # an unquoted run id on the command line
            values[field.name] = _parse_value(key, raw, hints[field.name])
        groups[group_name] = group_type(**values)
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ValueError(f"unknown run-config keys: {', '.join(unknown)}")
    return RunConfig(**groups)  # type: ignore[arg-type]


def to_flat(config: RunConfig) -> dict[str, ConfigValue]:
    """Flatten ``config`` to dotted kebab-case keys (inverse of load_run_config)."""
    flat: dict[str, ConfigValue] = {}
    for group_field in dataclasses.fields(config):
        group = getattr(config, group_field.name)
        for field in dataclasses.fields(group):
            value = getattr(group, field.name)
            if isinstance(value, tuple):
                value = ",".join(str(item) for item in value)
            elif isinstance(value, StrEnum):
                value = value.value
            flat[_flat_key(group_field.name, field.name)] = value
    return flat


def _flatten(table: Mapping[str, object], prefix: str = "") -> dict[str, ConfigValue]:
    flat: dict[str, ConfigValue] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{key}."))
        else:
            flat[key] = typing.cast(ConfigValue, value)
    return flat


def read_default_run_config(pyproject: Path = PYPROJECT) -> dict[str, ConfigValue]:
    """Read the flat run-config defaults from ``pyproject.toml`` as Flower does."""
    with pyproject.open("rb") as handle:
        document = tomllib.load(handle)
    table = document["tool"]["flwr"]["app"]["config"]
    return _flatten(table)


def load_default_config(**overrides: ConfigValue) -> RunConfig:
    """Return the pyproject defaults with dotted-key ``overrides`` applied.

    Example:
        >>> load_default_config(**{"train.epochs": 3}).train.epochs
        3
    """
    flat = read_default_run_config()
    flat.update(overrides)
    return load_run_config(flat)
