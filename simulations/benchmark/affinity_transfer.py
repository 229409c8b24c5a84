"""Transfer paths for the ``affinity`` benchmark: train them, choose them, score them.

A transfer step ``s -> t`` fine-tunes the current model on ``t``'s labelled cases
(:func:`core.training.job.train_source_model` from the current weights); a path
``v0 -> ... -> target`` trains on ``v0`` from the seeded start, fine-tunes along the
rest and is scored on the target's evaluation labels. :class:`PathTrainer` caches
models by path prefix, so every source is trained from scratch once per seed. A site
other than the federation's target can be a target too, through
:func:`few_label_view` (its labelled training cases cut to a few). One seed's Dice is
noisy (the same step moves by about 0.06 between ``train.seed`` values, as much as
the sources differ), so every Dice is a mean over one :class:`PathTrainer` per seed
(:func:`average_single_steps`, :func:`evaluate_target`). :func:`evaluate_target`
chooses one target's paths under the config's affinity weights and scores each of
them; the run, its document and table are :mod:`simulations.benchmark.affinity`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.affinity.graph import TaskFactors
from core.affinity.job import finetune_config
from core.affinity.matrix import (
    SiteMatrix,
    affinity_matrices,
    distance_matrix,
    normalise,
    normalise_polarity,
    polarity_matrix,
)
from core.affinity.path_choice import choose_path
from core.affinity.paths import TransferPath, paper_path
from core.affinity.profile import SiteProfile, build_site_profile, profile_settings
from core.config import RunConfig
from core.data.dataset import index_site
from core.data.synthetic_chain import read_chain_levels
from core.logs import Progress
from core.training.evaluation import evaluate_predictors
from core.training.job import build_initial_weights, train_source_model
from core.training.networks import Arrays
from simulations.benchmark.affinity_calibration import PairTerms, pair_terms
from simulations.benchmark.tgma import spearman


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Recipe:
    """How a path is trained: from scratch on its first site, then fine-tuned."""

    scratch: RunConfig
    finetune: RunConfig


def build_recipe(config: RunConfig) -> Recipe:
    """``config`` for the first site; its fine-tuning twin for every later step.

    The twin is the pipeline's own (:func:`core.affinity.job.finetune_config`):
    ``affinity.finetune-epochs`` at ``affinity.finetune-learning-rate``.
    """
    return Recipe(scratch=config, finetune=finetune_config(config))


def read_federation_roles(federation_dir: Path) -> dict[str, object]:
    """``federation.toml`` of a chain federation (target, intermediates, landmarks).

    Raises:
        ValueError: the file is missing or lacks ``target`` or ``landmarks``.
    """
    path = federation_dir / "federation.toml"
    if not path.is_file():
        raise ValueError(
            f"{path}: missing; the affinity benchmark needs a chain federation "
            "(core/data/synthetic_chain.py) naming its target and landmarks"
        )
    roles = tomllib.loads(path.read_text())
    missing = [key for key in ("target", "landmarks") if key not in roles]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} entry")
    return roles


def few_label_view(site_dir: Path, view_dir: Path, *, num_labelled: int) -> Path:
    """A view of a site with only its first ``num_labelled`` labelled cases.

    The view is a folder of symbolic links: ``dataset.json``, the evaluation folders
    and the first ``num_labelled`` training image/label pairs (in case order).

    Raises:
        ValueError: ``num_labelled < 1`` or ``view_dir`` exists.
        SiteDataError: the site folder is invalid (from :func:`index_site`).
    """
    if num_labelled < 1:
        raise ValueError(f"a target needs >= 1 labelled case, got {num_labelled}")
    if view_dir.exists():
        raise ValueError(f"{view_dir}: already exists; choose a new folder")
    index = index_site(site_dir)
    view_dir.mkdir(parents=True)
    for name in ("dataset.json", "imagesTs", "labelsTs"):
        if (site_dir / name).exists():
            (view_dir / name).symlink_to((site_dir / name).resolve())
    for folder in ("imagesTr", "labelsTr"):
        (view_dir / folder).mkdir()
    for case in index.labelled[:num_labelled]:
        for path in (case.image_path, case.label_path):
            assert path is not None
            (view_dir / path.parent.name / path.name).symlink_to(path.resolve())
    return view_dir


class PathTrainer:
    """Trains transfer paths, caching every prefix's model.

    A prefix is a tuple of ``(site, folder)`` steps, so the same site as a full source
    and as a few-label target are different steps.
    """

    def __init__(self, recipe: Recipe, *, progress: Progress) -> None:
        self._recipe = recipe
        self._progress = progress
        self._models: dict[tuple[tuple[str, Path], ...], Arrays] = {}
        self._initial = build_initial_weights(recipe.scratch)
        self.steps_trained = 0

    def model(self, steps: Sequence[tuple[str, Path]]) -> Arrays:
        """The model trained along ``steps`` (trained now unless cached)."""
        key = tuple(steps)
        if key in self._models:
            return self._models[key]
        first = len(key) == 1
        start = self._initial if first else self.model(key[:-1])
        config = self._recipe.scratch if first else self._recipe.finetune
        name, folder = key[-1]
        result = train_source_model(folder, config, initial_weights=start)
        self.steps_trained += 1
        self._progress(
            f"[affinity] seed {self._recipe.scratch.train.seed}: "
            f"{' -> '.join(site for site, _ in key)}: "
            f"{'trained' if first else 'fine-tuned'} on {name} ({result.num_cases} "
            f"cases), loss {result.final_loss:.3f} ({result.seconds:.1f} s)"
        )
        self._models[key] = result.weights
        return result.weights


def score(site_dir: Path, weights: Arrays, config: RunConfig) -> float:
    """Dice of one model on the site's evaluation labels."""
    scores = evaluate_predictors(
        site_dir, {"m": weights}, {"m": [("m", 1.0)]}, config, with_hd95=False
    )
    return scores["m"].dice


def random_path(
    sources: Sequence[str], target: str, *, hops: int, seed: int
) -> tuple[str, ...]:
    """A seeded random simple path of ``hops`` edges through ``sources`` to ``target``.

    Example:
        >>> random_path(["A", "B", "C"], "T", hops=2, seed=0)
        ('B', 'C', 'T')

    Raises:
        ValueError: ``hops`` is not in ``[1, len(sources)]``.
    """
    if not 1 <= hops <= len(sources):
        raise ValueError(f"hops must be in [1, {len(sources)}], got {hops}")
    return (*random.Random(seed).sample(sorted(sources), hops), target)


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class TargetSetup:
    """One target: its folders, sources and the normalised affinity terms."""

    name: str
    folder: Path  # the few-label view (the federation's target: its own folder)
    sources: dict[str, Path]
    image_norm: SiteMatrix
    label_norm: SiteMatrix
    polarity_norm: SiteMatrix  # every site's profile carries the polarity term here
    labelled: dict[str, int]  # every site's labelled cases as its profile says
    factors: dict[str, TaskFactors]  # every site's modality and labels (dataset.json)
    # Every site's (appearance, anatomy) grid levels from its dataset.json; None unless
    # every site is a chain site. Only the reference Spearman uses them, never d.
    levels: dict[str, tuple[int, int]] | None

    def terms(self, dice: Mapping[str, float]) -> PairTerms:
        """The sources' terms to this target with their one-step Dice."""
        names = list(self.sources)
        return pair_terms(
            [self.image_norm.get(name, self.name) for name in names],
            [1.0 - self.label_norm.get(name, self.name) for name in names],
            [dice[name] for name in names],
            [self.polarity_norm.get(name, self.name) for name in names],
        )

    def distances(
        self, image_weight: float, label_weight: float, polarity_weight: float
    ) -> SiteMatrix:
        """``d`` over the federation as this target sees it, at these weights."""
        return distance_matrix(
            self.image_norm,
            self.label_norm,
            image_weight=image_weight,
            label_weight=label_weight,
            polarity_norm=self.polarity_norm,
            polarity_weight=polarity_weight,
        )


def setup_target(
    name: str,
    folder: Path,
    sites: Mapping[str, Path],
    profiles: Mapping[str, SiteProfile],
    config: RunConfig,
) -> TargetSetup:
    """One target's setup: its profile from ``folder``, the others' from ``profiles``.

    ``H``, ``R`` and ``P`` are normalised over the federation as this target sees it;
    every profile is computed with its polarity term (so its weight can be fitted),
    which a weight of 0 leaves out of ``d``.
    """
    own = build_site_profile(folder, profile_settings(config.affinity, polarity=True))
    scenario = {site: profiles[site] for site in sites if site != name}
    scenario[name] = dataclasses.replace(own, site=name)
    image_norm, label_norm = normalise(*affinity_matrices(scenario))
    polarity_norm = normalise_polarity(polarity_matrix(scenario))
    folders = {**sites, name: folder}
    indexes = {site: index_site(path) for site, path in folders.items()}
    levels = {site: read_chain_levels(path) for site, path in sites.items()}
    return TargetSetup(
        name=name,
        folder=folder,
        sources={site: path for site, path in sites.items() if site != name},
        image_norm=image_norm,
        label_norm=label_norm,
        polarity_norm=polarity_norm,
        labelled={site: profile.num_labelled for site, profile in scenario.items()},
        factors={
            site: TaskFactors.from_class_names(index.modality, index.class_names)
            for site, index in indexes.items()
        },
        levels=(
            None
            if any(value is None for value in levels.values())
            else {site: value for site, value in levels.items() if value is not None}
        ),
    )


def factor_levels_apart(
    levels: Mapping[str, tuple[int, int]], source: str, target: str
) -> int:
    """Grid levels between two chain sites: appearance plus anatomy levels apart.

    The generator's own distance (:mod:`core.data.synthetic_chain`), which no site
    publishes.

    Example:
        >>> factor_levels_apart({"T": (0, 0), "L": (2, 1)}, "L", "T")
        3
    """
    (source_appearance, source_anatomy), (target_appearance, target_anatomy) = (
        levels[source],
        levels[target],
    )
    return abs(source_appearance - target_appearance) + abs(
        source_anatomy - target_anatomy
    )


def _steps(setup: TargetSetup, nodes: Sequence[str]) -> list[tuple[str, Path]]:
    return [
        (node, setup.folder if node == setup.name else setup.sources[node])
        for node in nodes
    ]


def _path_dice(
    trainer: PathTrainer, setup: TargetSetup, nodes: Sequence[str], config: RunConfig
) -> float:
    return score(setup.folder, trainer.model(_steps(setup, nodes)), config)


SingleSteps = dict[str, dict[str, float]]  # source -> zero_shot_dice, dice


def measure_single_steps(
    trainer: PathTrainer, setup: TargetSetup, config: RunConfig
) -> SingleSteps:
    """Per source: zero-shot Dice and Dice after one fine-tuning step on the target."""
    measured = {}
    for source in setup.sources:
        measured[source] = {
            "zero_shot_dice": _path_dice(trainer, setup, [source], config),
            "dice": _path_dice(trainer, setup, [source, setup.name], config),
        }
    return measured


def average_single_steps(per_seed: Sequence[SingleSteps]) -> SingleSteps:
    """Per source: the mean over the seeds of its zero-shot and one-step Dice.

    Example:
        >>> average_single_steps([
        ...     {"A": {"zero_shot_dice": 0.25, "dice": 0.5}},
        ...     {"A": {"zero_shot_dice": 0.75, "dice": 1.0}},
        ... ])
        {'A': {'zero_shot_dice': 0.5, 'dice': 0.75}}

    Raises:
        ValueError: no seed, or the seeds measured different sources or values.
    """
    if not per_seed:
        raise ValueError("no seed's one-step Dice to average")
    first = per_seed[0]
    shape = {source: list(values) for source, values in first.items()}
    if any(
        {source: list(values) for source, values in measured.items()} != shape
        for measured in per_seed
    ):
        raise ValueError(f"every seed must measure the same sources and values {shape}")
    return {
        source: {
            key: math.fsum(measured[source][key] for measured in per_seed)
            / len(per_seed)
            for key in keys
        }
        for source, keys in shape.items()
    }


def _mean_path_dice(
    trainers: Mapping[int, PathTrainer],
    setup: TargetSetup,
    paths: Mapping[int, Sequence[str]],
    config: RunConfig,
) -> tuple[float, list[float]]:
    """Mean over the seeds of each seed's path Dice (``paths``: seed -> nodes)."""
    values = [
        _path_dice(trainer, setup, paths[seed], config)
        for seed, trainer in trainers.items()
    ]
    return math.fsum(values) / len(values), values


def evaluate_target(
    trainers: Mapping[int, PathTrainer],
    setup: TargetSetup,
    measured: Sequence[SingleSteps],
    config: RunConfig,
    *,
    landmarks: Sequence[str],
    number: int,
    paper_form: tuple[float, float] | None = None,
) -> dict[str, object]:
    """Choose the paths under the config's weights, train them and score them.

    Args:
        trainers: seed -> that seed's trainer; every Dice is the mean over them.
        setup: the target.
        measured: :func:`measure_single_steps` of each trainer, in ``trainers``
            order; the path choice's oracle and Spearman use their mean.
        config: its affinity weights choose the paths.
        landmarks: the federation's landmarks (the paper path's starts).
        number: the target's position; the random path of seed ``s`` is drawn with
            seed ``s + number``, so targets and seeds get different draws.
        paper_form: ``(a, b)`` of the paper's two-term form to compare with, when
            the config weighs the polarity term: the row's ``paper_form`` then holds
            that form's Spearman, its chosen path (trained and scored) and its
            affinity-best source's one-step Dice. None, or a config without the
            polarity term, records none.
    """
    affinity = config.affinity
    distances = setup.distances(
        affinity.image_weight, affinity.label_weight, affinity.polarity_weight
    )
    sources, target = list(setup.sources), setup.name
    single = average_single_steps(measured)
    dice = {source: single[source]["dice"] for source in sources}
    choice = choose_path(
        distances,
        labelled={source: setup.labelled[source] for source in sources},
        target=target,
        affinity=affinity,
        factors=setup.factors,
    )
    chosen = choice.path
    usable = [site for site in landmarks if site in setup.sources]
    paper: TransferPath | None = (
        paper_path(distances, landmarks=usable, candidates=sources, target=target)
        if usable and len(sources) > 1
        else None
    )
    nearest = min(sources, key=lambda site: (distances.get(site, target), site))
    oracle = max(sources, key=lambda site: (dice[site], site))
    shuffled = {
        seed: random_path(sources, target, hops=chosen.hops, seed=seed + number)
        for seed in trainers
    }
    path, path_per_seed = _mean_path_dice(
        trainers, setup, dict.fromkeys(trainers, chosen.nodes), config
    )
    paper_dice, paper_per_seed = (
        (math.nan, [])
        if paper is None
        else _mean_path_dice(
            trainers, setup, dict.fromkeys(trainers, paper.nodes), config
        )
    )
    random_dice, random_per_seed = _mean_path_dice(trainers, setup, shuffled, config)
    scores = [-distances.get(site, target) for site in sources]
    compared = (
        None
        if paper_form is None or affinity.polarity_weight == 0.0
        else _paper_form_row(trainers, setup, single, config, paper_form)
    )

    return {
        "path": path,
        "paper_path": paper_dice,
        "direct_affinity_best": dice[nearest],
        "direct_oracle_best": dice[oracle],
        "random_path": random_dice,
        "spearman": spearman(scores, [dice[site] for site in sources]),
        "spearman_zero_shot": spearman(
            scores, [single[site]["zero_shot_dice"] for site in sources]
        ),
        # The same Dice ranked by the generator's true factor distance instead of
        # -d: how far an affinity that knew the grid would get on this measurement.
        "spearman_factor_levels": (
            math.nan
            if setup.levels is None
            else spearman(
                [-factor_levels_apart(setup.levels, site, target) for site in sources],
                [dice[site] for site in sources],
            )
        ),
        "per_seed": {
            "seeds": list(trainers),
            "path": path_per_seed,
            "paper_path": paper_per_seed,
            "random_path": random_per_seed,
            "spearman": [
                spearman(scores, [steps[site]["dice"] for site in sources])
                for steps in measured
            ],
        },
        "chosen": {
            "path": list(chosen.nodes),
            "paper_path": None if paper is None else list(paper.nodes),
            "direct_affinity_best": nearest,
            "direct_oracle_best": oracle,
            "random_paths": [list(nodes) for nodes in shuffled.values()],
            "communities": [
                {"members": list(c.members), "landmark": c.landmark}
                for c in choice.communities
            ],
        },
        "single_step": {
            source: {
                "distance": distances.get(source, target),
                "image_term": setup.image_norm.get(source, target),
                "label_term": 1.0 - setup.label_norm.get(source, target),
                "polarity_term": setup.polarity_norm.get(source, target),
                **single[source],
                "dice_per_seed": [steps[source]["dice"] for steps in measured],
            }
            for source in sources
        },
        "paper_form": compared,
    }


def _paper_form_row(
    trainers: Mapping[int, PathTrainer],
    setup: TargetSetup,
    single: SingleSteps,
    config: RunConfig,
    weights: tuple[float, float],
) -> dict[str, object]:
    """One target under the paper's two-term ``d`` at ``weights`` (``c = 0``)."""
    image_weight, label_weight = weights
    distances = setup.distances(image_weight, label_weight, 0.0)
    sources, target = list(setup.sources), setup.name
    choice = choose_path(
        distances,
        labelled={source: setup.labelled[source] for source in sources},
        target=target,
        affinity=config.affinity,
        factors=setup.factors,
    )
    path, path_per_seed = _mean_path_dice(
        trainers, setup, dict.fromkeys(trainers, choice.path.nodes), config
    )
    nearest = min(sources, key=lambda site: (distances.get(site, target), site))
    scores = [-distances.get(site, target) for site in sources]
    return {
        "weights": {"image_weight": image_weight, "label_weight": label_weight},
        "path": path,
        "path_per_seed": path_per_seed,
        "direct_affinity_best": single[nearest]["dice"],
        "spearman": spearman(scores, [single[site]["dice"] for site in sources]),
        "chosen": {"path": list(choice.path.nodes), "direct_affinity_best": nearest},
        "distance": {site: distances.get(site, target) for site in sources},
    }
