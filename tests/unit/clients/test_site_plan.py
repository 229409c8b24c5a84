"""How a site applies a request's resolution plan (clients.site.apply_request_plan)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients.site import apply_request_plan
from core import protocol
from core.config import IntensityNormalisation, load_default_config
from core.data.dataset import build_slice_set, index_site
from tests.conftest import copy_as_ct_site
from tests.unit.clients.messages import build_message

WINDOW = [-100.0, 200.0, 40.0, 50.0]


def plan_message(**plan: object) -> Message:
    content = RecordDict()
    content[protocol.PLAN_KEY] = ConfigRecord(plan)  # type: ignore[arg-type]
    return build_message(content, protocol.TRAIN_SOURCE)


@pytest.fixture
def ct_site(federation: Path, tmp_path: Path) -> Path:
    """Site A again, its dataset.json saying CT (its intensities are not HU)."""
    return copy_as_ct_site(federation / "A", tmp_path / "A-ct")


def test_a_ct_site_takes_the_plans_window(ct_site: Path) -> None:
    config = load_default_config(**{"data.image-size": 0})
    message = plan_message(
        **{"image-size": 32, "batch-size": 4, "spacing-mm": 1.5, "ct-window": WINDOW}
    )

    planned = apply_request_plan(config, message, ct_site)

    assert planned.data.image_size == 32
    assert planned.data.normalisation is IntensityNormalisation.CT
    assert planned.data.ct_window == tuple(WINDOW)
    assert planned.train.batch_size == 16  # the run's: it set one


def test_an_mr_site_ignores_the_ct_window(federation: Path) -> None:
    message = plan_message(
        **{"image-size": 32, "batch-size": 4, "spacing-mm": 1.5, "ct-window": WINDOW}
    )

    planned = apply_request_plan(
        load_default_config(),
        message,
        federation / "A",
    )

    assert planned.data.normalisation is IntensityNormalisation.ZSCORE


def test_a_ct_site_without_a_window_is_z_scored(ct_site: Path) -> None:
    planned = apply_request_plan(
        load_default_config(),
        build_message(RecordDict(), protocol.TRAIN_SOURCE),
        ct_site,
    )

    assert planned.data.normalisation is IntensityNormalisation.ZSCORE


def test_the_ct_window_normalises_every_volume_alike(federation: Path) -> None:
    # Prepare: a window, and the same site z-scored
    cases = index_site(federation / "A").labelled
    windowed = load_default_config(
        **{
            "data.image-size": 32,
            "data.normalisation": "ct",
            "data.ct-window": "-100,200,40,50",
        }
    ).data
    zscored = load_default_config(**{"data.image-size": 32}).data

    # Execute
    ct = build_slice_set(cases, data=windowed, with_labels=False).images
    z = build_slice_set(cases, data=zscored, with_labels=False).images

    # Assert: values lie in the window's range, (200 - 40) / 50 at most
    assert float(ct.max()) <= (200 - 40) / 50 + 1e-6
    assert float(ct.min()) >= (-100 - 40) / 50 - 1e-6
    assert not np.allclose(ct.numpy(), z.numpy())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.image-size": 0}, "data.image-size is 0 (the resolution plan's)"),
        (
            {"data.image-size": 32, "data.normalisation": "ct"},
            "data.normalisation is 'ct' but data.ct-window is empty",
        ),
    ],
)
def test_unresolved_settings_are_refused_naming_the_key(
    federation: Path, overrides: dict[str, object], message: str
) -> None:
    data = load_default_config(**overrides).data  # type: ignore[arg-type]

    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
    ):
        build_slice_set(
            index_site(federation / "A").labelled, data=data, with_labels=False
        )
