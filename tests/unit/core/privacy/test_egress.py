"""Measuring and digesting message content the same way on both sides."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from core.privacy.egress import ERROR_FIELD, measure_content, measure_error
from core.privacy.ledger import ArrayRelease


def build_content(
    *,
    weights: np.ndarray | None = None,
    loss: float = 0.25,
    settings: dict[str, object] | None = None,
) -> RecordDict:
    content = RecordDict()
    array = np.arange(6, dtype=np.float32).reshape(2, 3) if weights is None else weights
    content["weights"] = ArrayRecord({"conv.weight": Array(array)})
    content["metrics"] = MetricRecord({"loss": loss, "itm.B": [0.5, 0.25, 1.0]})
    content["reply"] = ConfigRecord(settings or {"site": "B", "raw": b"\x00\x01"})  # type: ignore[arg-type]
    return content


def test_measure_content_describes_every_record() -> None:
    # Execute
    measured = measure_content(build_content(), message_type="train.source")

    # Assert
    description, egress = measured.description, measured.egress
    assert description.message_type == "train.source"
    assert [(a.record, a.name, a.shape, a.nbytes) for a in description.arrays] == [
        ("weights", "conv.weight", (2, 3), 24)
    ]
    assert description.metric_records == {"metrics": {"itm.B": 3, "loss": 1}}
    assert description.config_records == {
        "reply": {"raw": 16, "site": 3}
    }  # {"bytes":"0001"}
    assert egress.arrays == (
        ArrayRelease(
            record="weights",
            name="conv.weight",
            shape=(2, 3),
            dtype="float32",
            nbytes=24,
        ),
    )
    assert egress.metrics == {"metrics/itm.B": 3, "metrics/loss": 1}
    assert egress.configs == {"reply/raw": 16, "reply/site": 3}
    assert egress.total_bytes == description.total_bytes > 24


def test_digest_is_the_same_for_the_same_content_and_changes_with_it() -> None:
    # Prepare
    same = measure_content(build_content(), message_type="x").egress.digest

    # Execute
    again = measure_content(build_content(), message_type="x").egress.digest
    other_value = measure_content(build_content(loss=0.26), message_type="x")
    other_array = measure_content(
        build_content(weights=np.ones((2, 3), np.float32)), message_type="x"
    )
    other_dtype = measure_content(
        build_content(weights=np.arange(6, dtype=np.float64).reshape(2, 3)),
        message_type="x",
    )
    other_shape = measure_content(
        build_content(weights=np.arange(6, dtype=np.float32).reshape(3, 2)),
        message_type="x",
    )

    # Assert
    assert again == same
    assert len(same) == 64
    digests = {
        same,
        other_value.egress.digest,
        other_array.egress.digest,
        other_dtype.egress.digest,
        other_shape.egress.digest,
    }
    assert len(digests) == 5


def test_digest_survives_the_flower_round_trip() -> None:
    # Prepare: what the coordinator receives is a deserialised copy
    content = build_content()
    copied = RecordDict(
        {
            "weights": ArrayRecord(
                {"conv.weight": Array(content["weights"]["conv.weight"].numpy())}
            ),
            "metrics": MetricRecord(dict(content["metrics"])),
            "reply": ConfigRecord(dict(content["reply"])),
        }
    )

    # Execute / Assert
    assert (
        measure_content(content, message_type="x").egress.digest
        == measure_content(copied, message_type="x").egress.digest
    )


@pytest.mark.parametrize("reason", ["", "SiteDataError: /site/imagesTr: missing"])
def test_measure_error_digests_the_reason(reason: str) -> None:
    # Execute
    egress = measure_error(reason)

    # Assert
    assert egress.arrays == ()
    assert egress.configs == {ERROR_FIELD: len(reason.encode())}
    assert egress.total_bytes == len(reason.encode())
    assert egress.digest == hashlib.sha256(reason.encode()).hexdigest()
