"""The run store: one folder per run under ``runs/<run-id>/``.

Holds the resolved config, one JSON file per finished phase, the models the
coordinator received (``.npz``, no pickle) and the report. Every file is written under a
temporary name and renamed, so a crash never leaves a half-written result, and every
path is checked to stay inside the run folder: names that come from sites (site and
model names) are validated where they arrive, and this is the second line.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from core.training.networks import Arrays, load_weights, save_weights
from server.results import (
    AdaptationResult,
    AffinityResult,
    ConsensusResult,
    DiscoverResult,
    EvaluationResult,
    PhaseResult,
    PlanResult,
    RunResults,
    SemisupResult,
    SourceTrainingResult,
    TransferabilityResult,
)

ResultT = TypeVar("ResultT", bound=PhaseResult)


def to_strict_json(value: Any) -> Any:
    """Replace NaN/inf (e.g. an undefined HD95) by None, so files stay valid JSON.

    Example:
        >>> to_strict_json({"hd95": float("nan"), "dice": [0.5, float("inf")]})
        {'hd95': None, 'dice': [0.5, None]}
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: to_strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_strict_json(item) for item in value]
    return value


class RunStore:
    """Files of one run.

    Args:
        run_dir: the run's folder (created).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        (self.run_dir / "phases").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "models").mkdir(parents=True, exist_ok=True)

    def _inside(self, relative: str) -> Path:
        """``run_dir / relative``, refusing any path that leaves the run folder.

        Raises:
            ValueError: the path climbs out of ``run_dir`` (naming it).
        """
        path = self.run_dir / relative
        if not path.resolve().is_relative_to(self.run_dir.resolve()):
            raise ValueError(
                f"refusing to write {relative!r}: it leaves the run folder "
                f"{self.run_dir}"
            )
        return path

    def write_json(self, relative: str, document: Mapping[str, Any]) -> Path:
        """Write ``document`` as indented JSON at ``run_dir / relative``."""
        path = self._inside(relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(
            json.dumps(to_strict_json(document), indent=2, allow_nan=False) + "\n"
        )
        temporary.replace(path)
        return path

    def write_text(self, relative: str, text: str) -> Path:
        """Write ``text`` at ``run_dir / relative``."""
        path = self._inside(relative)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(text)
        temporary.replace(path)
        return path

    def save_result(self, result: PhaseResult) -> Path:
        """Persist a finished phase's result (before the next phase starts)."""
        return self.write_json(f"phases/{result.PHASE}.json", result.to_document())

    def load_result(self, kind: type[ResultT]) -> ResultT | None:
        """A finished phase's typed result, or None when the phase has not finished.

        Raises:
            ResultError: the file does not fit the record (naming file and key).
        """
        document = self.load_phase(kind.PHASE)
        if document is None:
            return None
        return kind.from_document(
            document, where=str(self.run_dir / "phases" / f"{kind.PHASE}.json")
        )

    def load_results(self) -> RunResults:
        """Every finished phase's typed result (None where a phase has not finished)."""
        return RunResults(
            discover=self.load_result(DiscoverResult),
            plan=self.load_result(PlanResult),
            source_training=self.load_result(SourceTrainingResult),
            affinity=self.load_result(AffinityResult),
            transferability=self.load_result(TransferabilityResult),
            adaptation=self.load_result(AdaptationResult),
            consensus=self.load_result(ConsensusResult),
            semisup=self.load_result(SemisupResult),
            evaluation=self.load_result(EvaluationResult),
        )

    def load_phase(self, name: str) -> dict[str, Any] | None:
        """A finished phase's result as its JSON document (None: not finished)."""
        path = self.run_dir / "phases" / f"{name}.json"
        if not path.exists():
            return None
        loaded: dict[str, Any] = json.loads(path.read_text())
        return loaded

    def save_model(self, name: str, weights: Arrays) -> Path:
        """Keep a model the coordinator received."""
        path = self._inside(f"models/{name}.npz")
        save_weights(weights, path)
        return path

    def load_model(self, name: str) -> Arrays:
        """A model saved by :meth:`save_model`."""
        return load_weights(self._inside(f"models/{name}.npz"))
