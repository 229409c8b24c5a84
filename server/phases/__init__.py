"""The coordinator's phases (docs/architecture.md#the-phases), one module each.

discovery -> source_training -> affinity (SeqTran) -> transferability -> adaptation
(TGMA) -> consensus (DeepSTAPLE) -> semisup (UG-MCL) -> evaluation.

Each phase module's ``run`` sends one kind of message through the
:class:`~server.coordinator.Coordinator`, waits for the replies, records which sites
did not answer and why, persists its result to the run store before the next phase
starts, and returns it. Only weights, scores and aggregate metrics arrive here; the
coordinator never sees an image, a label or a prediction map. ``server/runner.py``
calls the phases in order and resumes a run from the ones it finished.
"""

from server.phases import (
    adaptation,
    affinity,
    consensus,
    discovery,
    evaluation,
    plan,
    semisup,
    source_training,
    transferability,
)

__all__ = [
    "adaptation",
    "affinity",
    "consensus",
    "discovery",
    "evaluation",
    "plan",
    "semisup",
    "source_training",
    "transferability",
]
