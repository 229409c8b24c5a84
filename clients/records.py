"""Core payloads and weights <-> Flower records, on the site's side.

The only place in ``clients/`` that builds or reads ``ArrayRecord``s; record keys come
from :mod:`core.protocol`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

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


def read_named_models(content: RecordDict) -> dict[str, Arrays]:
    """Every ``model.<name>`` ArrayRecord of a message, by name."""
    models = {}
    for key, record in content.array_records.items():
        name = protocol.model_name(key)
        if name is not None:
            models[name] = from_array_record(record)
    return models


def read_weights(content: RecordDict) -> Arrays:
    """The message's single set of weights (e.g. the ``train.semisup`` student).

    Raises:
        ValueError: the message carries no ``weights`` record.
    """
    if protocol.WEIGHTS_KEY not in content.array_records:
        raise ValueError(f"message carries no {protocol.WEIGHTS_KEY!r} record")
    return from_array_record(content.array_records[protocol.WEIGHTS_KEY])


def read_request(content: RecordDict) -> ConfigRecord:
    """The request's ConfigRecord (empty when the coordinator sent none)."""
    return content.config_records.get(protocol.REQUEST_KEY, ConfigRecord())


def build_reply(
    message: Message,
    *,
    settings: Mapping[str, object] | None = None,
    metrics: Mapping[str, object] | None = None,
    models: Mapping[str, Arrays] | None = None,
    weights: Arrays | None = None,
) -> Message:
    """Build the reply to ``message`` from payload fields and weights."""
    content = RecordDict()
    if settings is not None:
        content[protocol.REPLY_KEY] = ConfigRecord(dict(settings))  # type: ignore[arg-type]
    if metrics is not None:
        content[protocol.METRICS_KEY] = MetricRecord(dict(metrics))  # type: ignore[arg-type]
    if weights is not None:
        content[protocol.WEIGHTS_KEY] = to_array_record(weights)
    for name, model in (models or {}).items():
        content[protocol.model_key(name)] = to_array_record(model)
    return Message(content, reply_to=message)
