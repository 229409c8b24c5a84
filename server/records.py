"""Core payloads and weights <-> Flower records, on the coordinator's side.

The only place in ``server/`` that builds or reads ``ArrayRecord``s; record keys come
from :mod:`core.protocol`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from core import protocol
from core.training.networks import Arrays


def to_array_record(weights: Mapping[str, npt.NDArray[np.generic]]) -> ArrayRecord:
    """Wrap ``name -> numpy array`` as an ArrayRecord (names kept)."""
    return ArrayRecord(
        array_dict={
            name: Array(np.ascontiguousarray(value)) for name, value in weights.items()
        }
    )


def from_array_record(record: ArrayRecord) -> Arrays:
    """Unwrap an ArrayRecord to ``name -> float32 numpy array``."""
    return {name: array.numpy().astype(np.float32) for name, array in record.items()}


def build_request(
    *,
    settings: Mapping[str, object] | None = None,
    models: Mapping[str, Arrays] | None = None,
    weights: Arrays | None = None,
) -> RecordDict:
    """A request's content: settings, named models and/or one set of weights."""
    content = RecordDict()
    if settings is not None:
        content[protocol.REQUEST_KEY] = ConfigRecord(dict(settings))  # type: ignore[arg-type]
    if weights is not None:
        content[protocol.WEIGHTS_KEY] = to_array_record(weights)
    for name, model in (models or {}).items():
        content[protocol.model_key(name)] = to_array_record(model)
    return content


def read_settings(content: RecordDict) -> ConfigRecord:
    """The reply's ConfigRecord (empty if absent)."""
    return content.config_records.get(protocol.REPLY_KEY, ConfigRecord())


def read_metrics(content: RecordDict) -> MetricRecord:
    """The reply's MetricRecord (empty if absent)."""
    return content.metric_records.get(protocol.METRICS_KEY, MetricRecord())


def read_weights(content: RecordDict) -> Arrays:
    """The reply's single set of weights."""
    if protocol.WEIGHTS_KEY not in content.array_records:
        raise ValueError(f"reply carries no {protocol.WEIGHTS_KEY!r} record")
    return from_array_record(content.array_records[protocol.WEIGHTS_KEY])


def read_named_models(content: RecordDict) -> dict[str, Arrays]:
    """Every ``model.<name>`` ArrayRecord of a reply, by name."""
    models = {}
    for key, record in content.array_records.items():
        name = protocol.model_name(key)
        if name is not None:
            models[name] = from_array_record(record)
    return models
