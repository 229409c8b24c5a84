"""Attack class 3: a task profile as fine as the case it is computed from.

``query.profile`` releases the mean foreground map of a site's labelled training
cases on a ``affinity.label-grid``^3 grid the coordinator chooses. At a site with one
labelled case and a fine grid that map is the case's label map. Under the default
policy the grid is capped (``limits.max-label-grid``), the label term stays home
below ``limits.min-cases`` labelled cases, and a site with fewer training images than
that answers no profile at all.

Two weaknesses this suite found, now closed: the foreground quantiles of a site with
few labelled cases were its cases' own foreground fractions (without DP they now stand
on means of ``limits.min-cases`` cases), and profiles were not counted against the
site's query limits (each is now a query unit, at most
``limits.max-profiles-per-run`` per run).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813 - the library's own spelling

from core import protocol
from core.privacy.policy import Rule
from tests.security.attacker import assert_refused, assert_released, metrics_of
from tests.security.conftest import OpenSite

LABEL_TERM = ("mean-label-map", "foreground-quantiles")


def test_the_label_term_stays_home_at_a_site_with_one_labelled_case(
    open_site: OpenSite, site_copy: Callable[[str, str], Path]
) -> None:
    # Prepare: two training images, one of them labelled
    directory = site_copy("A", "one-label")
    (directory / "labelsTr" / "a_001.nii.gz").unlink()
    site = open_site("A", directory=directory)

    # Execute: the finest grid the default policy allows
    reply = site.send(protocol.PROFILE, run_overrides={"affinity.label-grid": 32})

    # Assert: the image term leaves, nothing of the one label map does
    entry = assert_released(site, reply)
    metrics = metrics_of(reply)
    assert (metrics["num-images"], metrics["num-labelled"]) == (2, 1)
    assert metrics["label-grid"] == 0
    assert not set(LABEL_TERM) & set(metrics)
    assert entry.egress is not None
    assert not {f"metrics/{key}" for key in LABEL_TERM} & set(entry.egress.metrics)
    assert len(metrics["image-quantiles"]) == 101  # type: ignore[arg-type]


def test_a_label_grid_above_the_cap_is_refused_before_any_work(
    open_site: OpenSite, handler_calls: list[str]
) -> None:
    # Prepare
    site = open_site("A")

    # Execute: a grid as fine as the 64 x 64 case would rebuild it
    reply = site.send(protocol.PROFILE, run_overrides={"affinity.label-grid": 64})

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "affinity.label-grid is 64, limits.max-label-grid allows 32",
    )
    assert handler_calls == []


def test_a_site_with_a_single_training_image_answers_no_profile(
    open_site: OpenSite,
    site_copy: Callable[[str, str], Path],
    handler_calls: list[str],
) -> None:
    # Prepare: its image term would be that one image's quantile function
    directory = site_copy("A", "one-image")
    (directory / "imagesTr" / "a_001_0000.nii.gz").unlink()
    (directory / "labelsTr" / "a_001.nii.gz").unlink()
    site = open_site("A", directory=directory)

    # Execute
    reply = site.send(protocol.PROFILE)

    # Assert
    assert_refused(
        site,
        reply,
        Rule.LIMIT_EXCEEDED,
        "query.profile stands on 1 training images, limits.min-cases requires 2",
    )
    assert handler_calls == []


def test_foreground_quantiles_do_not_release_each_cases_foreground_fraction(
    open_site: OpenSite, federation: Path
) -> None:
    # Prepare: each labelled case's foreground fraction (the attacker never sees it)
    site = open_site("A")
    fractions = [
        float(np.mean(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0))
        for path in sorted((federation / "A" / "labelsTr").iterdir())
    ]

    # Execute
    reply = site.send(protocol.PROFILE)

    # Assert: no case's fraction can be read off the reply; the quantiles stand on
    # the mean of the two (limits.min-cases), as every released aggregate does
    assert_released(site, reply)
    released = metrics_of(reply)["foreground-quantiles"]
    assert len(fractions) == 2
    assert not any(round(fraction, 3) in released for fraction in fractions)  # type: ignore[operator]
    assert set(released) == {round(sum(fractions) / 2, 3)}  # type: ignore[arg-type]


def test_profiles_at_other_grids_count_against_the_query_limits(
    open_site: OpenSite,
) -> None:
    # Prepare
    site = open_site("A")

    # Execute: the same run asks for the profile at three grids
    replies = [
        site.send(
            protocol.PROFILE,
            run_overrides={"affinity.label-grid": grid},
            message_id=f"m{grid}",
        )
        for grid in (32, 31, 30)
    ]

    # Assert: each is a query charged to the site's book, and the third is one too
    # many for one run (limits.max-profiles-per-run = 2)
    assert_released(site, replies[0])
    assert_released(site, replies[1])
    assert_refused(
        site,
        replies[2],
        Rule.LIMIT_EXCEEDED,
        "this run already had 2 profiles answered and asks for 1 more; "
        "limits.max-profiles-per-run allows 2 per run",
        message_id="m30",
    )
    assert site.query_book()["1"] == {"profiles": 2}
