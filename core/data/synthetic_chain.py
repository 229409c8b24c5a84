"""Deterministic synthetic federation whose sites form chains of domains (SeqTran).

The built-in federation (:mod:`core.data.synthetic`) puts sites on one continuum, where every
property drifts together: a site between two others resembles each a little, but nothing
separates *what* differs. SeqTran's sequential transfer (docs/methods.md#seqtran) gains
where one transfer step changes one factor of the task and a direct step changes two. So
here two factors vary independently, each on three ordered levels, and the sites fill
the 3 x 3 grid:

- **Appearance** (the image factor, SeqTran's modality): ``bright`` (the organ well
  above the tissue, clean), ``faint`` (half the contrast, more bias, noise and blur)
  and ``dark`` (inverted contrast, the most bias, noise, blur and the coarsest
  resolution). Every appearance level draws anatomy from the same distribution.
- **Anatomy** (the label factor, SeqTran's label): ``large`` (the organ central),
  ``medium`` and ``small`` (the organ shrinks and moves up and left). Every anatomy
  level is rendered with the same acquisition.

A site's role follows from how many factors separate it from the target at
(``bright``, ``large``): none, the **target** (few labels); one, an **intermediate**
(4 sites); both, a **landmark** (4 sites, the most labels). Names read
``<role>-<appearance>-<anatomy>``, e.g. ``L-dark-small``. Every intermediate shares
one factor with two landmarks and the other with the target, so for a landmark
``L-a-n`` the paths ``L-a-n -> I-a-large -> T`` and ``L-a-n -> I-bright-n -> T`` change
one factor per step where direct transfer ``L-a-n -> T`` changes both; with levels
ordered, longer chains change one level per step (``L-dark-small -> L-dark-medium ->
I-dark-large -> I-faint-large -> T``). The target's domain is the built-in site ``A``'s.

Randomness is explicit: a case's parameters come from one ``numpy.random.Generator``
seeded from ``(seed, CHAIN_STREAM, appearance level, anatomy level, split, index)``,
so a site's cases depend only on its grid cell, not on which other sites exist, and
the evaluation cases do not change with the number of training cases (training sets
for 2, 5 and 10 labels are nested). Renders with :func:`core.data.synthetic.generate_case`
and writes with :func:`core.data.synthetic.write_case`; never imports flwr or torch.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Final

import numpy as np

from core.coerce import is_integer
from core.data.synthetic import (
    EVALUATION_CASES_PER_SITE,
    SiteStyle,
    generate_case,
    generate_once,
    write_case,
)

# Bump when this generator's output changes, so cached chain federations are
# regenerated. Independent of core.data.synthetic.GENERATOR_VERSION.
CHAIN_GENERATOR_VERSION: Final = 1
# A seed word no built-in site uses, so a chain cell never redraws a built-in case.
CHAIN_STREAM: Final = 7007


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Appearance:
    """A level of the image factor: how the site renders and acquires a case."""

    name: str
    organ_contrast: float  # organ minus tissue intensity (negative = inverted)
    bias_amplitude: float
    noise_sd: float
    blur_sigma_px: float
    resolution_factor: float  # >1 = coarser in-plane acquisition, upsampled back


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Anatomy:
    """A level of the label factor: the organ's size and position."""

    name: str
    organ_scale: float
    organ_offset_px: tuple[float, float]  # (row, col) shift of the organ centre


# Level 0 of both is the built-in continuum at shift 0 (site A); ``dark`` is its
# acquisition at shift 1. ``faint`` keeps the sign but halves the contrast, so the
# brighter vessels, not the organ, are the brightest blobs there. ``small`` keeps the
# organ larger than the vessels on average but within their size range, and its
# offset moves it away from both the vessels and the tube.
APPEARANCES: Final = (
    Appearance(
        name="bright",
        organ_contrast=0.40,
        bias_amplitude=0.05,
        noise_sd=0.02,
        blur_sigma_px=0.3,
        resolution_factor=1.0,
    ),
    Appearance(
        name="faint",
        organ_contrast=0.20,
        bias_amplitude=0.15,
        noise_sd=0.04,
        blur_sigma_px=0.6,
        resolution_factor=1.25,
    ),
    Appearance(
        name="dark",
        organ_contrast=-0.25,
        bias_amplitude=0.25,
        noise_sd=0.06,
        blur_sigma_px=0.9,
        resolution_factor=1.5,
    ),
)
ANATOMIES: Final = (
    Anatomy(name="large", organ_scale=1.0, organ_offset_px=(0.0, 0.0)),
    Anatomy(name="medium", organ_scale=0.8, organ_offset_px=(-4.0, -2.0)),
    Anatomy(name="small", organ_scale=0.6, organ_offset_px=(-8.0, -4.0)),
)


class ChainRole(enum.StrEnum):
    """A site's role, from how many factors separate it from the target."""

    TARGET = "target"
    INTERMEDIATE = "intermediate"
    LANDMARK = "landmark"


_ROLE_PREFIX: Final = {
    ChainRole.TARGET: "T",
    ChainRole.INTERMEDIATE: "I",
    ChainRole.LANDMARK: "L",
}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class ChainSite:
    """One site of the chain federation: its grid cell, role and rendering style.

    Attributes:
        name: the folder name, ``<role letter>-<appearance>-<anatomy>``.
        role: from the number of factors that differ from the target.
        appearance_level: index into :data:`APPEARANCES` (0 = the target's).
        anatomy_level: index into :data:`ANATOMIES` (0 = the target's).
        style: what :func:`core.data.synthetic.generate_case` renders; its ``shift`` is
            the grid distance to the target over the largest one (0 to 1).
        num_train_cases: labelled training cases (6 evaluation cases come on top).
    """

    name: str
    role: ChainRole
    appearance_level: int
    anatomy_level: int
    style: SiteStyle
    num_train_cases: int

    def to_metadata(self) -> dict[str, object]:
        """The site's factors and style, as written into its ``dataset.json``."""
        style = dataclasses.asdict(self.style)
        del style["name"], style["shift"]  # the folder name and dataset.json's shift
        return {
            "role": self.role.value,
            "appearance": APPEARANCES[self.appearance_level].name,
            "appearance_level": self.appearance_level,
            "anatomy": ANATOMIES[self.anatomy_level].name,
            "anatomy_level": self.anatomy_level,
            "style": style,
        }


def get_chain_role(appearance_level: int, anatomy_level: int) -> ChainRole:
    """Return the role of a grid cell: how many factors differ from the target.

    Example:
        >>> get_chain_role(2, 0), get_chain_role(1, 2)
        (<ChainRole.INTERMEDIATE: 'intermediate'>, <ChainRole.LANDMARK: 'landmark'>)
    """
    changed = (appearance_level != 0) + (anatomy_level != 0)
    return (ChainRole.TARGET, ChainRole.INTERMEDIATE, ChainRole.LANDMARK)[changed]


def _build_style(name: str, appearance_level: int, anatomy_level: int) -> SiteStyle:
    appearance, anatomy = APPEARANCES[appearance_level], ANATOMIES[anatomy_level]
    largest = (len(APPEARANCES) - 1) + (len(ANATOMIES) - 1)
    return SiteStyle(
        name=name,
        shift=(appearance_level + anatomy_level) / largest,
        organ_contrast=appearance.organ_contrast,
        inverted=appearance.organ_contrast < 0,
        bias_amplitude=appearance.bias_amplitude,
        noise_sd=appearance.noise_sd,
        blur_sigma_px=appearance.blur_sigma_px,
        resolution_factor=appearance.resolution_factor,
        organ_scale=anatomy.organ_scale,
        organ_offset_px=anatomy.organ_offset_px,
    )


def build_chain_sites(
    *, num_train_cases: int, num_intermediate_cases: int, num_target_cases: int
) -> tuple[ChainSite, ...]:
    """Return the nine sites of the grid: the target, then intermediates, landmarks.

    Within a role, sites come in (appearance level, anatomy level) order.

    Args:
        num_train_cases: labelled training cases per landmark.
        num_intermediate_cases: labelled training cases per intermediate.
        num_target_cases: labelled training cases of the target (few).

    Raises:
        ValueError: a count below 1.
    """
    counts = {
        ChainRole.LANDMARK: num_train_cases,
        ChainRole.INTERMEDIATE: num_intermediate_cases,
        ChainRole.TARGET: num_target_cases,
    }
    for role, count in counts.items():
        if count < 1:
            raise ValueError(f"{role.value} training cases must be >= 1, got {count}")
    sites = []
    for appearance_level, appearance in enumerate(APPEARANCES):
        for anatomy_level, anatomy in enumerate(ANATOMIES):
            role = get_chain_role(appearance_level, anatomy_level)
            name = f"{_ROLE_PREFIX[role]}-{appearance.name}-{anatomy.name}"
            sites.append(
                ChainSite(
                    name=name,
                    role=role,
                    appearance_level=appearance_level,
                    anatomy_level=anatomy_level,
                    style=_build_style(name, appearance_level, anatomy_level),
                    num_train_cases=counts[role],
                )
            )
    order = tuple(ChainRole)
    return tuple(sorted(sites, key=lambda site: order.index(site.role)))


def _chain_case_rng(
    seed: int, site: ChainSite, *, training: bool, index: int
) -> np.random.Generator:
    split = 0 if training else 1
    return np.random.default_rng(
        [seed, CHAIN_STREAM, site.appearance_level, site.anatomy_level, split, index]
    )


def write_chain_site(site: ChainSite, site_dir: Path, *, seed: int) -> None:
    """Write one site in the site layout, with its factors in ``dataset.json``."""
    site_dir.mkdir(parents=True, exist_ok=True)
    prefix = site.name.lower()
    for case_number in range(site.num_train_cases + EVALUATION_CASES_PER_SITE):
        training = case_number < site.num_train_cases
        index = case_number if training else case_number - site.num_train_cases
        write_case(
            generate_case(
                site.style,
                _chain_case_rng(seed, site, training=training, index=index),
            ),
            site_dir,
            case_id=f"{prefix}_{case_number:03d}",
            training=training,
        )
    dataset = {
        "name": f"synthetic chain site {site.name}",
        "modality": "synthetic-MR",
        "labels": {"0": "background", "1": "organ"},
        "shift": site.style.shift,
        **site.to_metadata(),
    }
    (site_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


def read_chain_levels(site_dir: Path) -> tuple[int, int] | None:
    """Return a site's ``(appearance level, anatomy level)`` from its ``dataset.json``.

    The levels :func:`write_chain_site` records; ``None`` for a site that records
    neither (not a chain site, e.g. a real hospital's folder).

    Raises:
        ValueError: ``dataset.json`` is missing or not a JSON object, only one level is
            recorded, or a level is not an integer of the grid (0 to 2).
    """
    path = Path(site_dir) / "dataset.json"
    try:
        metadata = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"{path}: cannot read the site's dataset.json ({error})"
        ) from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: dataset.json must hold a JSON object")
    keys = ("appearance_level", "anatomy_level")
    present = [key for key in keys if key in metadata]
    if not present:
        return None
    counts = (len(APPEARANCES), len(ANATOMIES))
    levels = []
    for key, count in zip(keys, counts, strict=True):
        value = metadata.get(key)
        if not is_integer(value):
            raise ValueError(
                f"{path}: {key} must be an integer level, got {value!r} (a chain "
                f"site records both {keys[0]} and {keys[1]})"
            )
        if not 0 <= value < count:
            raise ValueError(f"{path}: {key} must be in [0, {count - 1}], got {value}")
        levels.append(value)
    return levels[0], levels[1]


def _toml_names(sites: tuple[ChainSite, ...], role: ChainRole) -> str:
    return ", ".join(f'"{site.name}"' for site in sites if site.role == role)


def write_chain_federation(
    out_dir: Path,
    *,
    seed: int,
    num_train_cases: int,
    num_intermediate_cases: int,
    num_target_cases: int,
    progress: Callable[[str], None] | None = None,
) -> tuple[ChainSite, ...]:
    """Write the chain federation: nine site folders plus ``federation.toml``.

    ``federation.toml`` names the ``target`` (``T-bright-large``) and lists the
    ``intermediates`` and ``landmarks``. As in
    :func:`core.data.synthetic.write_federation`, the folder is assembled under a
    temporary name and renamed at the end.

    Args:
        out_dir: folder to create; must not exist yet.
        seed: the same seed always gives the same files.
        num_train_cases: labelled training cases per landmark.
        num_intermediate_cases: labelled training cases per intermediate.
        num_target_cases: labelled training cases of the target.
        progress: called with one line per site written.

    Returns:
        The sites as written, the target first (see :func:`build_chain_sites`).

    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: a case count below 1.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose a new folder")
    sites = build_chain_sites(
        num_train_cases=num_train_cases,
        num_intermediate_cases=num_intermediate_cases,
        num_target_cases=num_target_cases,
    )
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    for site in sites:
        write_chain_site(site, staging / site.name, seed=seed)
        if progress is not None:
            progress(
                f"site {site.name} ({site.role.value}): {site.num_train_cases} "
                f"training + {EVALUATION_CASES_PER_SITE} evaluation cases"
            )
    target = next(site.name for site in sites if site.role == ChainRole.TARGET)
    (staging / "federation.toml").write_text(
        "# Synthetic chain federation (core/data/synthetic_chain.py): sites on a 3 x 3\n"
        "# grid of appearance (bright, faint, dark) x anatomy (large, medium, small).\n"
        f'target = "{target}"\n'
        f"intermediates = [{_toml_names(sites, ChainRole.INTERMEDIATE)}]\n"
        f"landmarks = [{_toml_names(sites, ChainRole.LANDMARK)}]\n"
        f"seed = {seed}\n"
    )
    try:
        staging.rename(out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(
            f"{out_dir}: already exists; choose a new folder"
        ) from None
    return sites


def get_chain_federation_dir(
    cache_dir: Path,
    *,
    seed: int,
    num_train_cases: int,
    num_intermediate_cases: int,
    num_target_cases: int,
) -> Path:
    """Where the chain federation for these parameters lives inside ``cache_dir``."""
    return Path(cache_dir) / (
        f"synthetic-chain-v{CHAIN_GENERATOR_VERSION}-seed{seed}-"
        f"cases{num_train_cases}-{num_intermediate_cases}-{num_target_cases}"
    )


def ensure_chain_federation(
    cache_dir: Path,
    *,
    seed: int,
    num_train_cases: int,
    num_intermediate_cases: int,
    num_target_cases: int,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the cached chain federation, generating it on first use."""
    folder = get_chain_federation_dir(
        cache_dir,
        seed=seed,
        num_train_cases=num_train_cases,
        num_intermediate_cases=num_intermediate_cases,
        num_target_cases=num_target_cases,
    )
    return generate_once(
        folder,
        lambda: write_chain_federation(
            folder,
            seed=seed,
            num_train_cases=num_train_cases,
            num_intermediate_cases=num_intermediate_cases,
            num_target_cases=num_target_cases,
            progress=progress,
        ),
        description="synthetic chain federation",
        progress=progress,
    )
