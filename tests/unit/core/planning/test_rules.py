"""The plan rules (core.planning.rules) on fingerprints of known geometry."""

from __future__ import annotations

import pytest

from core.config import SliceAxis, load_default_config
from core.planning.fingerprint import SiteFingerprint
from core.planning.rules import ResolutionPlan, apply_plan, derive_plan

PLAN = load_default_config().plan
STRIDES = (2, 2, 2)


def print_of(
    spacing: tuple[float, float, float],
    shape: tuple[float, float, float],
    *,
    images: int = 20,
    modality: str = "MRI",
    ct: tuple[float, ...] | None = None,
    labelled: int = 0,
) -> SiteFingerprint:
    return SiteFingerprint(
        modality=modality,
        num_images=images,
        num_labelled=labelled,
        spacing_mm=spacing,
        shape=shape,
        ct_intensities=ct,
    )


def test_prostate_like_mr_sites_plan_their_native_resolution() -> None:
    # Prepare: three MR sites near 0.6 x 0.6 x 3 mm, 256 x 256 x 20 (z, y, x order)
    prints = {
        "A": print_of((0.6, 0.6, 3.0), (20, 256, 256)),
        "B": print_of((0.5, 0.5, 3.6), (24, 320, 320)),
        "C": print_of((0.7, 0.7, 3.0), (20, 224, 224)),
    }

    # Execute
    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    # Assert: median spacing; slices across z; the median in-plane extent at 0.6 mm
    # (C's 224 x 0.7 mm = 261.3 px) rounded up to a multiple of 8
    assert plan.target_spacing_mm == (0.6, 0.6, 3.0)
    assert plan.slice_axis is SliceAxis.Z
    assert plan.image_size == 264
    # 2^21 pixels hold 30 slices; 5% of the median site's 400 slices is 20
    assert plan.batch_size == 20
    assert plan.normalisation == {"MRI": "zscore"}
    assert plan.ct_window == ()
    assert plan.sites == ("A", "B", "C")


def test_the_anisotropic_axis_takes_its_10th_percentile() -> None:
    # Prepare: most sites at 5 mm slices, one at 2.5 mm (nnU-Net's anisotropy rule)
    prints = {
        name: print_of((0.8, 0.8, 5.0), (30, 512, 512)) for name in ("A", "B", "C")
    }
    prints["D"] = print_of((0.8, 0.8, 2.5), (60, 512, 512))

    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    assert plan.target_spacing_mm[2] == 2.5
    assert any("anisotropic" in rule for rule in plan.rules)


def test_the_image_size_is_capped_by_the_plan_setting() -> None:
    prints = {"A": print_of((0.5, 0.5, 1.0), (200, 1024, 1024))}

    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    assert plan.image_size == PLAN.max_image_size
    assert plan.batch_size == 8  # 2^21 / 512^2
    assert any("capped by plan.max-image-size" in rule for rule in plan.rules)


def test_the_built_in_federation_plans_its_own_64_px() -> None:
    prints = {
        name: print_of((1.5, 1.5, 3.0), (10, 64, 64), images=12) for name in "ABC"
    }

    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    assert (plan.image_size, plan.slice_axis) == (64, SliceAxis.Z)
    assert plan.batch_size == 6  # 5% of 120 slices


def test_ct_sites_pool_their_foreground_window() -> None:
    # Prepare: two CT sites (8 and 24 labelled cases) and one MR site
    prints = {
        "A": print_of(
            (0.8, 0.8, 2.5),
            (100, 512, 512),
            modality="CT",
            ct=(-50.0, 40.0, 150.0, 45.0, 30.0),
            labelled=8,
        ),
        "B": print_of(
            (0.8, 0.8, 2.5),
            (100, 512, 512),
            modality="ct",
            ct=(-30.0, 60.0, 170.0, 65.0, 30.0),
            labelled=24,
        ),
        "C": print_of((0.8, 0.8, 2.5), (100, 512, 512), modality="MR"),
    }

    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    low, high, mean, sd = plan.ct_window
    assert (low, high, mean) == pytest.approx((-35.0, 165.0, 60.0))
    # pooled: sqrt(30^2 + the spread of the means, 0.25 * 15^2 + 0.75 * 5^2)
    assert sd == pytest.approx((900 + 0.25 * 225 + 0.75 * 25) ** 0.5)
    assert plan.normalisation == {"CT": "ct", "MR": "zscore", "ct": "ct"}


def test_a_ct_site_without_an_intensity_term_is_said_to_be_z_scored() -> None:
    prints = {"A": print_of((0.8, 0.8, 2.5), (100, 512, 512), modality="CT")}

    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    assert plan.ct_window == ()
    assert "CT sites released no intensity term" in plan.rules[-1]


def test_no_fingerprint_is_refused() -> None:
    with pytest.raises(ValueError, match="no site released a fingerprint"):
        derive_plan({}, plan=PLAN, strides=STRIDES)


def test_the_plan_document_round_trips() -> None:
    prints = {"A": print_of((0.6, 0.6, 3.0), (20, 256, 256))}
    plan = derive_plan(prints, plan=PLAN, strides=STRIDES)

    assert ResolutionPlan.from_document(plan.to_document()) == plan


def test_the_plan_fills_only_what_the_run_leaves_to_it() -> None:
    # Prepare
    left = load_default_config(
        **{"data.image-size": 0, "train.batch-size": 0, "data.ct-window": ""}
    )
    set_by_run = load_default_config(
        **{"data.image-size": 32, "data.ct-window": "-100,200,40,50"}
    )
    window = (-35.0, 165.0, 60.0, 34.0)

    # Execute
    filled = apply_plan(
        left, image_size=256, batch_size=20, spacing_mm=0.6, ct_window=window
    )
    kept = apply_plan(
        set_by_run, image_size=256, batch_size=20, spacing_mm=0.6, ct_window=window
    )

    # Assert
    assert (filled.data.image_size, filled.train.batch_size) == (256, 20)
    assert filled.data.spacing_mm == 0.6
    assert filled.data.ct_window == window
    assert (kept.data.image_size, kept.train.batch_size) == (32, 16)
    assert kept.data.ct_window == (-100.0, 200.0, 40.0, 50.0)
