"""Deterministic synthetic multi-site federation, written in the site layout.

Each case is a small 3-D volume of textured soft tissue holding an organ-like target
blob with an irregular boundary, and distractors (round vessels, a tube). Sites lie on
a continuum ``shift`` in [0, 1]: along it the organ's contrast weakens and, past the
middle, inverts (the organ turns darker than the tissue around it, as between T1 and T2
weighting), and bias field, noise, blur, in-plane resolution and the organ's size and
position all drift. Sites close on the continuum transfer well;
far ones transfer badly, which is the negative transfer TGMA must avoid.

Randomness is explicit (TorchIO's lesson): every case's parameters are drawn from one
``numpy.random.Generator`` seeded from ``(seed, site, case)``, then applied. The same
seed always writes the same files. Writes through :mod:`core.data.io`; never imports flwr.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from core.config import FederationConfig, SyntheticScale, SyntheticShift
from core.data.io import Volume, write_volume

FloatArray = npt.NDArray[np.float32]

# Bump when the generator's output changes, so cached federations are regenerated.
GENERATOR_VERSION: Final = 4
DEFAULT_TARGET_INDEX: Final = 0
EVALUATION_CASES_PER_SITE: Final = 6
SHAPE_ZYX: Final = (10, 64, 64)
SPACING_MM: Final = (1.5, 1.5, 3.0)
INTENSITY_SCALE: Final = 1000.0

# Tissue intensities. The field of view is all soft tissue (like a cropped pelvic MR),
# with the organ and two distractors set by their contrast against it. A site's
# weighting scales the organ's contrast, and past INVERSION_SHIFT every contrast changes
# sign (as between T1 and T2 weighting): the organ turns from brighter to darker than
# the tissue around it, and so do the distractors.
TISSUE_LEVEL: Final = 0.45
ORGAN_CONTRAST: Final = 0.40
ORGAN_CONTRAST_DRIFT: Final = 0.15  # contrast lost from one end of a half to the other
VESSEL_CONTRAST: Final = 0.32  # small round blobs as bright (or dark) as the organ
TUBE_CONTRAST: Final = 0.20  # an elongated structure
INVERSION_SHIFT: Final = 0.5
# The mild-shift federation (``federation.synthetic-shift = "mild"``) spreads its sites
# over [0, MILD_MAX_SHIFT], short of the inversion, and gives each site a scanner drawn
# from these ranges (the wide federation's ends) instead of the continuum's drift.
MILD_MAX_SHIFT: Final = 0.45
SCANNER_BIAS_AMPLITUDE: Final = (0.05, 0.25)
SCANNER_NOISE_SD: Final = (0.02, 0.06)
SCANNER_BLUR_SIGMA_PX: Final = (0.3, 0.9)
SCANNER_RESOLUTION_FACTOR: Final = (1.0, 1.5)
# Stream id of a site's scanner draw, apart from its cases' (which use case indices).
_SCANNER_STREAM: Final = 1_000_003
# ``target_labelled`` of a federation whose target keeps every training label.
ALL_LABELLED: Final = None


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteStyle:
    """How one site acquires images: a point on the domain-shift continuum."""

    name: str
    shift: float  # 0 = the default target's domain, 1 = the farthest domain
    organ_contrast: float  # organ minus body intensity (negative = inverted)
    inverted: bool
    bias_amplitude: float
    noise_sd: float
    blur_sigma_px: float
    resolution_factor: float  # >1 = coarser in-plane acquisition, upsampled back
    organ_scale: float
    organ_offset_px: tuple[float, float]  # (row, col) shift of the organ centre

    @classmethod
    def on_continuum(cls, name: str, shift: float) -> SiteStyle:
        """Place a site at ``shift`` along the continuum (every property drifts)."""
        return cls(
            name=name,
            shift=shift,
            organ_contrast=(ORGAN_CONTRAST - ORGAN_CONTRAST_DRIFT * shift)
            * (-1.0 if shift > INVERSION_SHIFT else 1.0),
            inverted=shift > INVERSION_SHIFT,
            bias_amplitude=0.05 + 0.2 * shift,
            noise_sd=0.02 + 0.04 * shift,
            blur_sigma_px=0.3 + 0.6 * shift,
            resolution_factor=1.0 + 0.5 * shift,
            organ_scale=1.0 - 0.25 * shift,
            organ_offset_px=(4.0 * shift, -5.0 * shift),
        )

    def with_scanner(self, rng: np.random.Generator) -> SiteStyle:
        """This site with its own scanner: noise, bias, blur and resolution drawn.

        Anatomy and contrast stay on the continuum; the acquisition properties no
        longer grow with ``shift``, so two sites close on the continuum can still be
        scanned differently (as two hospitals' scanners are).
        """
        return dataclasses.replace(
            self,
            bias_amplitude=float(rng.uniform(*SCANNER_BIAS_AMPLITUDE)),
            noise_sd=float(rng.uniform(*SCANNER_NOISE_SD)),
            blur_sigma_px=float(rng.uniform(*SCANNER_BLUR_SIGMA_PX)),
            resolution_factor=float(rng.uniform(*SCANNER_RESOLUTION_FACTOR)),
        )

    def contrast_sign(self) -> float:
        """+1 for the organ brighter than the body, -1 for inverted sites."""
        return -1.0 if self.inverted else 1.0


def default_site_names(num_sites: int) -> tuple[str, ...]:
    """Return the site names ``A``, ``B``, ... ``Z``, ``AA``, ``AB``, ... (as columns).

    Past 26 sites the names go on as spreadsheet columns do, so every name stays a
    plain folder name (the characters after ``Z`` are punctuation).

    Example:
        >>> default_site_names(3)
        ('A', 'B', 'C')
        >>> default_site_names(28)[-3:]
        ('Z', 'AA', 'AB')
    """
    names: list[str] = []
    for index in range(num_sites):
        name, number = "", index + 1
        while number:
            number, letter = divmod(number - 1, 26)
            name = chr(ord("A") + letter) + name
        names.append(name)
    return tuple(names)


def build_site_styles(
    num_sites: int,
    *,
    shift: SyntheticShift = SyntheticShift.WIDE,
    seed: int = 0,
) -> tuple[SiteStyle, ...]:
    """Spread ``num_sites`` sites evenly over the continuum, site ``A`` at 0.

    ``shift`` WIDE: over the whole continuum (``seed`` unused). MILD: over
    ``[0, MILD_MAX_SHIFT]``, each site's scanner drawn from ``seed``.

    Example:
        >>> [round(s.shift, 2) for s in build_site_styles(4)]
        [0.0, 0.33, 0.67, 1.0]
        >>> [round(s.shift, 2) for s in build_site_styles(4, shift=SyntheticShift.MILD)]
        [0.0, 0.15, 0.3, 0.45]
    """
    names = default_site_names(num_sites)
    if shift is SyntheticShift.WIDE:
        return tuple(
            SiteStyle.on_continuum(name, index / (num_sites - 1))
            for index, name in enumerate(names)
        )
    return tuple(
        SiteStyle.on_continuum(
            name, MILD_MAX_SHIFT * index / (num_sites - 1)
        ).with_scanner(np.random.default_rng([seed, index, _SCANNER_STREAM]))
        for index, name in enumerate(names)
    )


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, ...], sigma: float
) -> FloatArray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    field: FloatArray = ndimage.gaussian_filter(
        rng.standard_normal(shape), sigma=sigma
    ).astype(np.float32)
    field -= field.mean()
    field /= field.std() + 1e-8
    return field


def _blob(
    grid: tuple[FloatArray, FloatArray, FloatArray],
    *,
    centre: tuple[float, ...],
    radii: tuple[float, ...],
    harmonics: npt.NDArray[np.float64],
    phases: npt.NDArray[np.float64],
) -> npt.NDArray[np.bool_]:
    """An ellipsoid whose in-plane radius is modulated by a few angular harmonics."""
    z, y, x = grid
    dz, dy, dx = (
        (z - centre[0]) / radii[0],
        (y - centre[1]) / radii[1],
        (x - centre[2]) / radii[2],
    )
    angle = np.arctan2(dy, dx)
    modulation = 1.0 + sum(
        amplitude * np.cos((order + 2) * angle + phase)
        for order, (amplitude, phase) in enumerate(zip(harmonics, phases, strict=True))
    )
    inside: npt.NDArray[np.bool_] = (dz**2 + (dy**2 + dx**2) / modulation**2) <= 1.0
    return inside


@dataclasses.dataclass(frozen=True, slots=True)
class SyntheticCase:
    """One generated case: image and label in ``(Z, Y, X)`` order."""

    image: FloatArray
    label: npt.NDArray[np.uint8]


def generate_case(style: SiteStyle, rng: np.random.Generator) -> SyntheticCase:
    """Draw one case's anatomy and render it in ``style``'s acquisition."""
    depth, height, width = SHAPE_ZYX
    grid = tuple(
        axis.astype(np.float32)
        for axis in np.meshgrid(
            np.arange(depth), np.arange(height), np.arange(width), indexing="ij"
        )
    )
    grid3 = (grid[0], grid[1], grid[2])
    mid_row, mid_col = height / 2, width / 2

    # Anatomy (random parameters first, then applied).
    organ_centre = (
        depth / 2 + rng.uniform(-0.7, 0.7),
        mid_row + 3 + style.organ_offset_px[0] + rng.uniform(-3, 3),
        mid_col - 2 + style.organ_offset_px[1] + rng.uniform(-3, 3),
    )
    organ_radius = style.organ_scale * rng.uniform(8.5, 11.0)
    organ = _blob(
        grid3,
        centre=organ_centre,
        radii=(
            rng.uniform(3.2, 4.2),
            organ_radius * rng.uniform(0.8, 1.0),
            organ_radius * rng.uniform(1.0, 1.25),
        ),
        harmonics=rng.uniform(0, 0.15, 3),
        phases=rng.uniform(0, 6.3, 3),
    )
    vessels = np.zeros(SHAPE_ZYX, dtype=bool)
    for row, col in ((mid_row - 16, mid_col + 14), (mid_row + 17, mid_col + 16)):
        radius = rng.uniform(3.5, 5.0)
        vessels |= _blob(
            grid3,
            centre=(depth / 2, row + rng.uniform(-3, 3), col + rng.uniform(-3, 3)),
            radii=(depth * 4.0, radius, radius * rng.uniform(0.9, 1.1)),
            harmonics=np.zeros(1),
            phases=np.zeros(1),
        )
    tube = _blob(
        grid3,
        centre=(
            depth / 2,
            mid_row + rng.uniform(-4, 4),
            mid_col - 22 + rng.uniform(-2, 2),
        ),
        radii=(depth * 4.0, rng.uniform(10, 14), rng.uniform(2.5, 3.5)),
        harmonics=np.zeros(1),
        phases=np.zeros(1),
    )
    vessels &= ~organ
    tube &= ~organ & ~vessels

    # Rendering in the site's weighting, with tissue texture at two scales.
    sign = style.contrast_sign()
    image = (TISSUE_LEVEL + 0.06 * _smooth_field(rng, SHAPE_ZYX, sigma=5.0)).astype(
        np.float32
    )
    texture = _smooth_field(rng, SHAPE_ZYX, sigma=1.5)
    image += 0.04 * texture
    for mask, contrast, texture_strength in (
        (vessels, sign * VESSEL_CONTRAST, 0.03),
        (tube, sign * TUBE_CONTRAST, 0.03),
        (organ, style.organ_contrast, 0.07),
    ):
        image[mask] = TISSUE_LEVEL + contrast + texture_strength * texture[mask]

    # Acquisition: resolution, blur, bias field, noise.
    if style.resolution_factor > 1.0:
        low = ndimage.zoom(
            image,
            (1, 1 / style.resolution_factor, 1 / style.resolution_factor),
            order=1,
        )
        image = ndimage.zoom(
            low, (1, height / low.shape[1], width / low.shape[2]), order=1
        ).astype(np.float32)
    image = ndimage.gaussian_filter(
        image, sigma=(0, style.blur_sigma_px, style.blur_sigma_px)
    )
    bias = np.exp(style.bias_amplitude * _smooth_field(rng, SHAPE_ZYX, sigma=16.0))
    image = image * bias + style.noise_sd * rng.standard_normal(SHAPE_ZYX)
    return SyntheticCase(
        image=(INTENSITY_SCALE * image).astype(np.float32), label=organ.astype(np.uint8)
    )


def _case_rng(seed: int, site_index: int, case_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, site_index, case_index])


def write_case(
    case: SyntheticCase,
    site_dir: Path,
    *,
    case_id: str,
    training: bool,
    labelled: bool = True,
) -> None:
    """Write one case's image and label NIfTI into the site layout.

    Args:
        case: the generated case.
        site_dir: the site folder; sub-folders are created as needed.
        case_id: the file stem (``<case_id>_0000.nii.gz`` and ``<case_id>.nii.gz``).
        training: ``imagesTr``/``labelsTr`` when true, else ``imagesTs``/``labelsTs``.
        labelled: write the label too; false writes the image alone (an unlabelled
            case).
    """
    split = "Tr" if training else "Ts"
    files: list[tuple[npt.NDArray[Any], str, str]] = [
        (case.image, f"images{split}", f"{case_id}_0000.nii.gz")
    ]
    if labelled:
        files.append((case.label, f"labels{split}", f"{case_id}.nii.gz"))
    for array, folder, file_name in files:
        write_volume(
            Volume(
                array=array,
                spacing_mm=SPACING_MM,
                origin_mm=(0.0, 0.0, 0.0),
                direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0),
            ),
            site_dir / folder / file_name,
        )


def write_site(
    style: SiteStyle,
    site_dir: Path,
    *,
    site_index: int,
    seed: int,
    num_train_cases: int,
    num_labelled: int | None = None,
    scanner: bool = False,
    evaluation_cases: int | None = None,
) -> None:
    """Write one site: ``imagesTr``/``labelsTr`` and ``imagesTs``/``labelsTs`` NIfTI.

    ``num_labelled`` training cases (the first ones by case id; None: all) get their
    label in ``labelsTr``; the others are unlabelled images. Every evaluation case is
    labelled. The images are the same whatever ``num_labelled`` is. ``scanner``
    records the site's acquisition properties in ``dataset.json`` (a mild-shift
    site's own scanner; the wide federation's files stay as they always were).
    ``evaluation_cases`` evaluation cases (None: :data:`EVALUATION_CASES_PER_SITE`)
    follow the training ones.
    """
    site_dir.mkdir(parents=True, exist_ok=True)
    if evaluation_cases is None:
        evaluation_cases = EVALUATION_CASES_PER_SITE
    total = num_train_cases + evaluation_cases
    labelled = num_train_cases if num_labelled is None else num_labelled
    for case_index in range(total):
        training = case_index < num_train_cases
        write_case(
            generate_case(style, _case_rng(seed, site_index, case_index)),
            site_dir,
            case_id=f"{style.name.lower()}_{case_index:03d}",
            training=training,
            labelled=not training or case_index < labelled,
        )
    dataset: dict[str, object] = {
        "name": f"synthetic site {style.name}",
        "modality": "synthetic-MR",
        "labels": {"0": "background", "1": "organ"},
        "shift": style.shift,
    }
    if scanner:
        dataset["scanner"] = {
            "bias_amplitude": round(style.bias_amplitude, 4),
            "noise_sd": round(style.noise_sd, 4),
            "blur_sigma_px": round(style.blur_sigma_px, 4),
            "resolution_factor": round(style.resolution_factor, 4),
        }
    (site_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")


def target_labelled_cases(num_train_cases: int, target_labelled: int | None) -> int:
    """How many labelled training cases the target keeps (``None``: all of them).

    Example:
        >>> target_labelled_cases(12, 2), target_labelled_cases(12, 40)
        (2, 12)
        >>> target_labelled_cases(12, ALL_LABELLED)
        12
    """
    if target_labelled is None:
        return num_train_cases
    if target_labelled < 0:
        raise ValueError(f"target_labelled must be >= 0 or None, got {target_labelled}")
    return min(target_labelled, num_train_cases)


def resolve_federation_dir(federation: FederationConfig) -> Path:
    """The federation folder a run uses: ``federation.dir``, else the built-in one.

    ``federation.cache-dir`` empty means ``~/.cache/sitebridge``. Does not generate
    anything (see :func:`ensure_builtin_federation`).
    """
    if federation.dir:
        return Path(federation.dir).expanduser()
    cache = (
        Path(federation.cache_dir).expanduser()
        if federation.cache_dir
        else Path.home() / ".cache" / "sitebridge"
    )
    return get_builtin_federation_dir(
        cache,
        seed=federation.synthetic_seed,
        num_sites=federation.synthetic_sites,
        num_train_cases=federation.synthetic_cases,
        target_labelled=federation.synthetic_target_labelled,
        shift=federation.synthetic_shift,
        scale=federation.synthetic_scale,
    )


def get_builtin_federation_dir(
    cache_dir: Path,
    *,
    seed: int,
    num_sites: int,
    num_train_cases: int,
    target_labelled: int | None,
    shift: SyntheticShift = SyntheticShift.WIDE,
    scale: SyntheticScale = SyntheticScale.SMALL,
) -> Path:
    """Where the built-in federation for these parameters lives inside ``cache_dir``.

    The name holds every parameter that changes the files: a few-label target adds
    ``-target<N>`` (its labelled cases); a fully labelled one (``target_labelled``
    None or >= ``num_train_cases``) keeps the name it always had, so the federation
    of a fully labelled benchmark is the same folder as before few-label targets. A
    mild-shift federation adds ``-mild``, a hospital-scale one ``-hospital`` (with
    the hospital generator's version past 1).

    Example:
        >>> get_builtin_federation_dir(Path("c"), seed=0, num_sites=6,
        ...     num_train_cases=12, target_labelled=2).name
        'synthetic-v4-seed0-sites6-cases12-target2'
        >>> get_builtin_federation_dir(Path("c"), seed=0, num_sites=6,
        ...     num_train_cases=12, target_labelled=ALL_LABELLED).name
        'synthetic-v4-seed0-sites6-cases12'
        >>> get_builtin_federation_dir(Path("c"), seed=1, num_sites=6,
        ...     num_train_cases=12, target_labelled=ALL_LABELLED,
        ...     shift=SyntheticShift.MILD).name
        'synthetic-v4-mild-seed1-sites6-cases12'
        >>> get_builtin_federation_dir(Path("c"), seed=0, num_sites=6,
        ...     num_train_cases=12, target_labelled=2,
        ...     scale=SyntheticScale.HOSPITAL).name
        'synthetic-v4-hospital-seed0-sites6-cases12-target2'
    """
    labelled = target_labelled_cases(num_train_cases, target_labelled)
    few = f"-target{labelled}" if labelled < num_train_cases else ""
    mild = "-mild" if shift is SyntheticShift.MILD else ""
    hospital = _hospital_suffix() if scale is SyntheticScale.HOSPITAL else ""
    return Path(cache_dir) / (
        f"synthetic-v{GENERATOR_VERSION}{mild}{hospital}-seed{seed}-"
        f"sites{num_sites}-cases{num_train_cases}{few}"
    )


def ensure_builtin_federation(
    cache_dir: Path,
    *,
    seed: int,
    num_sites: int,
    num_train_cases: int,
    target_labelled: int | None,
    shift: SyntheticShift = SyntheticShift.WIDE,
    scale: SyntheticScale = SyntheticScale.SMALL,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Return the cached built-in federation, generating it on first use.

    ``target_labelled``: the target's labelled training cases
    (``federation.synthetic-target-labelled``), or :data:`ALL_LABELLED` for a fully
    labelled target, which leave-one-site-out benchmarks need (every site is a
    source in turn).
    """
    folder = get_builtin_federation_dir(
        cache_dir,
        seed=seed,
        num_sites=num_sites,
        num_train_cases=num_train_cases,
        target_labelled=target_labelled,
        shift=shift,
        scale=scale,
    )
    return generate_once(
        folder,
        lambda: write_federation(
            folder,
            seed=seed,
            num_sites=num_sites,
            num_train_cases=num_train_cases,
            target_labelled=target_labelled,
            shift=shift,
            scale=scale,
            progress=progress,
        ),
        description="built-in synthetic federation",
        progress=progress,
    )


def generate_once(
    folder: Path,
    write: Callable[[], object],
    *,
    description: str,
    progress: Callable[[str], None] | None,
) -> Path:
    """Run ``write`` unless ``folder`` exists (a cached federation); return it."""
    if not folder.exists():
        if progress is not None:
            progress(f"generating the {description} in {folder}")
        # Another process may finish it first; its result is the same.
        with contextlib.suppress(FileExistsError):
            write()
    return folder


def _hospital_suffix() -> str:
    from core.data.synthetic_hospital import HOSPITAL_VERSION

    return "-hospital" + (str(HOSPITAL_VERSION) if HOSPITAL_VERSION > 1 else "")


def write_federation(
    out_dir: Path,
    *,
    seed: int,
    num_sites: int,
    num_train_cases: int,
    target_labelled: int | None = ALL_LABELLED,
    shift: SyntheticShift = SyntheticShift.WIDE,
    scale: SyntheticScale = SyntheticScale.SMALL,
    evaluation_cases: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[str, ...]:
    """Write a whole federation (one folder per site plus ``federation.toml``).

    The folder is assembled under a temporary name and renamed at the end, so a
    reader never sees a half-written federation.

    Args:
        out_dir: folder to create; must not exist yet.
        seed: the same seed always gives the same files.
        num_sites: number of sites (>= 3), spread evenly over the continuum.
        num_train_cases: training cases per site (``evaluation_cases`` evaluation
            cases are added per site), all labelled at the sources.
        target_labelled: labelled training cases of the default target (its first
            ones by case id; the others are written without a label), or
            :data:`ALL_LABELLED`. Its evaluation cases keep their labels, which
            only ever score. The images are the same whatever this is.
        shift: how far apart the sites are (:func:`build_site_styles`).
        scale: SMALL, the 10 x 64 x 64 volumes of this module; HOSPITAL, the
            hospital-sized MR and CT volumes of :mod:`core.data.synthetic_hospital`.
        evaluation_cases: evaluation cases per site; None (the built-in federation)
            means :data:`EVALUATION_CASES_PER_SITE`; fewer make quick tests.
        progress: called with one line per site written.

    Returns:
        The site names, the default target first.

    Raises:
        FileExistsError: ``out_dir`` exists.
        ValueError: fewer than 3 sites, or a negative ``target_labelled``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir}: already exists; choose a new folder")
    if num_sites < 3:
        raise ValueError(f"num_sites must be >= 3, got {num_sites}")
    target_cases = target_labelled_cases(num_train_cases, target_labelled)
    staging = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    if evaluation_cases is None:
        evaluation_cases = EVALUATION_CASES_PER_SITE
    if scale is SyntheticScale.HOSPITAL:
        names = _write_hospital_sites(
            staging,
            seed=seed,
            num_sites=num_sites,
            num_train_cases=num_train_cases,
            target_cases=target_cases,
            shift=shift,
            evaluation_cases=evaluation_cases,
            progress=progress,
        )
    else:
        names = _write_small_sites(
            staging,
            seed=seed,
            num_sites=num_sites,
            num_train_cases=num_train_cases,
            target_cases=target_cases,
            shift=shift,
            evaluation_cases=evaluation_cases,
            progress=progress,
        )
    few_label = (
        f"target-labelled = {target_cases}  # labelled training cases of the target\n"
        if target_cases < num_train_cases
        else ""
    )
    mild = 'shift = "mild"\n' if shift is SyntheticShift.MILD else ""
    hospital = 'scale = "hospital"\n' if scale is SyntheticScale.HOSPITAL else ""
    (staging / "federation.toml").write_text(
        "# Synthetic SiteBridge federation (core/data/synthetic.py).\n"
        f'target = "{names[0]}"\nseed = {seed}\n{mild}{hospital}{few_label}'
    )
    try:
        staging.rename(out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise FileExistsError(
            f"{out_dir}: already exists; choose a new folder"
        ) from None
    return names


def _write_small_sites(
    staging: Path,
    *,
    seed: int,
    num_sites: int,
    num_train_cases: int,
    target_cases: int,
    shift: SyntheticShift,
    evaluation_cases: int,
    progress: Callable[[str], None] | None,
) -> tuple[str, ...]:
    styles = build_site_styles(num_sites, shift=shift, seed=seed)
    target = styles[DEFAULT_TARGET_INDEX].name
    for site_index, style in enumerate(styles):
        labelled = target_cases if style.name == target else num_train_cases
        write_site(
            style,
            staging / style.name,
            site_index=site_index,
            seed=seed,
            num_train_cases=num_train_cases,
            num_labelled=labelled,
            scanner=shift is SyntheticShift.MILD,
            evaluation_cases=evaluation_cases,
        )
        if progress is not None:
            progress(
                f"site {style.name}: shift {style.shift:.2f} ({shift} federation), "
                f"{num_train_cases} training ({labelled} labelled) + "
                f"{evaluation_cases} evaluation cases"
            )
    return (target, *(style.name for style in styles if style.name != target))


def _write_hospital_sites(
    staging: Path,
    *,
    seed: int,
    num_sites: int,
    num_train_cases: int,
    target_cases: int,
    shift: SyntheticShift,
    evaluation_cases: int,
    progress: Callable[[str], None] | None,
) -> tuple[str, ...]:
    from core.data.synthetic_hospital import build_hospital_sites, write_hospital_site

    sites = build_hospital_sites(num_sites, shift=shift, seed=seed)
    target = sites[DEFAULT_TARGET_INDEX].name
    for site_index, site in enumerate(sites):
        labelled = target_cases if site.name == target else num_train_cases
        write_hospital_site(
            site,
            staging / site.name,
            site_index=site_index,
            seed=seed,
            num_train_cases=num_train_cases,
            num_labelled=labelled,
            num_evaluation=evaluation_cases,
        )
        if progress is not None:
            x, y, z = site.spacing_mm
            progress(
                f"site {site.name}: {site.modality}, shift {site.style.shift:.2f} "
                f"({shift} federation), {site.in_plane_size} x {site.in_plane_size} "
                f"x {site.slices} voxels of {x:.2f} x {y:.2f} x {z:.2f} mm, "
                f"{num_train_cases} training ({labelled} labelled) + "
                f"{evaluation_cases} evaluation cases"
            )
    return (target, *(site.name for site in sites if site.name != target))
