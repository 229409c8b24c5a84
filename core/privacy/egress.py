"""What one message carries, measured for the egress guard and the ledgers.

Owns the one way both sides describe a message's content: the per-array shapes and
sizes, per-field value counts and sizes the guard checks (:class:`ReplyDescription`),
the :class:`Egress` entry the ledgers record, and the SHA-256 digest of the content.
The site and the coordinator digest the same content identically, so an auditor can
match a site's ledger entry against the coordinator's entry for the same reply.

Works on anything shaped like a Flower ``RecordDict`` (``array_records``,
``metric_records``, ``config_records``; arrays with ``.numpy()``), so this module
never imports flwr.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from core.privacy.ledger import ArrayRelease, Egress
from core.privacy.policy import ArrayDescription, ReplyDescription
from core.protocol import LEDGER_ANCHOR_PREFIX, REPLY_KEY

ERROR_FIELD: Final = "error.reason"  # how an error reply's reason is measured


class ArrayLike(Protocol):
    """A Flower ``Array``: something that converts to a numpy array."""

    def numpy(self) -> npt.NDArray[Any]:
        """The array's values."""


class RecordContent(Protocol):
    """The parts of a Flower ``RecordDict`` this module reads."""

    @property
    def array_records(self) -> Mapping[str, Mapping[str, ArrayLike]]:
        """Array records by key."""

    @property
    def metric_records(self) -> Mapping[str, Mapping[str, Any]]:
        """Metric records by key."""

    @property
    def config_records(self) -> Mapping[str, Mapping[str, Any]]:
        """Config records by key."""


def _json_ready(value: object) -> object:
    """Config/metric values as JSON can hold them (bytes as hex, exactly)."""
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, list):
        return [_json_ready(item) for item in value]
    return value


def _encode(value: object) -> bytes:
    return json.dumps(
        _json_ready(value), sort_keys=True, separators=(",", ":"), allow_nan=True
    ).encode()


def _count(value: object) -> int:
    """Number of values a metric carries: 1 for a scalar, n for a list."""
    return len(value) if isinstance(value, list) else 1


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class MeasuredContent:
    """A message's content, measured: what the guard checks and the ledger records."""

    description: ReplyDescription
    egress: Egress


def measure_content(content: RecordContent, *, message_type: str) -> MeasuredContent:
    """Measure every record of a message's content and digest it.

    The digest is SHA-256 over, record by record in key order, each array's name,
    dtype, shape and raw bytes, and each metric or config value's canonical JSON.
    ``total_bytes`` counts every array's bytes and every value's canonical JSON, plus
    the names they travel under. A reply's ledger anchor (``ledger.*`` settings) is
    left out: the site adds it after recording the digest.

    Example:
        >>> class Content:
        ...     array_records = {"weights": {"w": np.zeros((2, 3), np.float32)}}
        ...     metric_records = {"metrics": {"loss": 0.5, "itm.B": [0.1, 0.2]}}
        ...     config_records = {}
        >>> measured = measure_content(Content(), message_type="train.source")
        >>> measured.egress.metrics, measured.description.arrays[0].shape
        ({'metrics/itm.B': 2, 'metrics/loss': 1}, (2, 3))
    """
    digest = hashlib.sha256()
    arrays: list[ArrayDescription] = []
    releases: list[ArrayRelease] = []
    total = 0
    for record_key in sorted(content.array_records):
        digest.update(f"array-record:{record_key}\n".encode())
        for name, array in content.array_records[record_key].items():
            values = np.ascontiguousarray(
                array.numpy() if hasattr(array, "numpy") else array
            )
            digest.update(f"{name}:{values.dtype.str}:{values.shape}\n".encode())
            digest.update(values.tobytes())
            shape = tuple(int(size) for size in values.shape)
            arrays.append(
                ArrayDescription(
                    record=record_key, name=name, shape=shape, nbytes=values.nbytes
                )
            )
            releases.append(
                ArrayRelease(
                    record=record_key,
                    name=name,
                    shape=shape,
                    dtype=values.dtype.name,
                    nbytes=values.nbytes,
                )
            )
            total += values.nbytes + len(name.encode())
    metric_records: dict[str, dict[str, int]] = {}
    config_records: dict[str, dict[str, int]] = {}
    metrics: dict[str, int] = {}
    configs: dict[str, int] = {}
    for kind, records, counts, flat in (
        ("metric", content.metric_records, metric_records, metrics),
        ("config", content.config_records, config_records, configs),
    ):
        for record_key in sorted(records):
            digest.update(f"{kind}-record:{record_key}\n".encode())
            counts[record_key] = {}
            for name, value in sorted(records[record_key].items()):
                if (
                    kind == "config"
                    and record_key == REPLY_KEY
                    and name.startswith(LEDGER_ANCHOR_PREFIX)
                ):
                    continue
                encoded = _encode(value)
                digest.update(f"{name}=".encode() + encoded + b"\n")
                size = len(encoded)
                counts[record_key][name] = _count(value) if kind == "metric" else size
                flat[f"{record_key}/{name}"] = counts[record_key][name]
                # Names leave too, and a wildcard field (``dice.*``) names anything.
                total += size + len(name.encode())
    return MeasuredContent(
        description=ReplyDescription(
            message_type=message_type,
            arrays=tuple(arrays),
            metric_records=metric_records,
            config_records=config_records,
            total_bytes=total,
        ),
        egress=Egress(
            arrays=tuple(releases),
            metrics=metrics,
            configs=configs,
            total_bytes=total,
            digest=digest.hexdigest(),
        ),
    )


def measure_error(reason: str) -> Egress:
    """What an error reply releases: its reason text, measured and digested.

    Example:
        >>> measure_error("boom").configs
        {'error.reason': 4}
    """
    encoded = reason.encode()
    return Egress(
        arrays=(),
        metrics={},
        configs={ERROR_FIELD: len(encoded)},
        total_bytes=len(encoded),
        digest=hashlib.sha256(encoded).hexdigest(),
    )
