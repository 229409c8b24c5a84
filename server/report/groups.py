"""The report's label groups: which predictors used the target's labels, and how.

The house rule (docs/methods.md#label-free-and-few-label): results that used any of
the target's labels are never mixed with label-free ones. Every predictor of the
evaluation carries its label use (``server.results.LabelUse``, joined over its
models); this module orders the predictors into the two groups and writes each
group's heading.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.results import FEW_LABEL, LABEL_FREE

GROUPS = (LABEL_FREE, FEW_LABEL)


def group_of(use: Mapping[str, Any]) -> str:
    """The group of a label use as the report holds it (``via``, ``cases``, ...).

    Example:
        >>> group_of({"via": [], "cases": 0, "atlases": 0})
        'label-free'
        >>> group_of({"via": ["fine-tuned at A on 2 labelled cases"], "cases": 2})
        'few-label'
    """
    return FEW_LABEL if use.get("via") else LABEL_FREE


def predictor_groups(evaluation: Mapping[str, Any]) -> dict[str, list[str]]:
    """The scored predictors by group, label-free first.

    Within a group, in the order the evaluation built them (``label_use``'s order:
    each candidate, ``uniform``, each TGMA pair, then the later phases' models).

    Example:
        >>> predictor_groups({"dice": {"a": 0.5, "b": 0.7, "c": 0.9},
        ...     "label_use": {"c": {"via": []}, "b": {"via": ["x"]}, "a": {"via": []}}})
        {'label-free': ['c', 'a'], 'few-label': ['b']}
    """
    uses = evaluation["label_use"]
    scored = [name for name in uses if name in evaluation["dice"]]
    return {
        group: [name for name in scored if group_of(uses[name]) == group]
        for group in GROUPS
    }


def group_heading(group: str, uses: list[Mapping[str, Any]]) -> str:
    """A group's heading: ``label-free``, or what the few-label ones used at most.

    Example:
        >>> group_heading("few-label", [{"via": ["x"], "cases": 2, "atlases": 0},
        ...                             {"via": ["y"], "cases": 1, "atlases": 0}])
        'few-label (used 2 labelled target cases)'
        >>> group_heading("few-label", [{"via": ["z"], "cases": 0, "atlases": 3}])
        'few-label (used 3 target atlases)'
    """
    if group == LABEL_FREE:
        return LABEL_FREE
    cases = max((int(use.get("cases", 0)) for use in uses), default=0)
    atlases = max((int(use.get("atlases", 0)) for use in uses), default=0)
    parts = [
        text
        for text, count in (
            (f"{cases} labelled target case{'s' * (cases != 1)}", cases),
            (f"{atlases} target atlas{'es' * (atlases != 1)}", atlases),
        )
        if count
    ]
    return f"{FEW_LABEL} (used {' and '.join(parts) or 'target labels'})"


def describe_use(use: Mapping[str, Any] | None) -> str:
    """One model's label use in words, for a section's sentence.

    Example:
        >>> describe_use({"via": []})
        'label-free'
        >>> describe_use({"via": ["fine-tuned at A on 2 labelled cases"]})
        'few-label: fine-tuned at A on 2 labelled cases'
    """
    if use is None:
        return "no model"
    if group_of(use) == LABEL_FREE:
        return LABEL_FREE
    return f"{FEW_LABEL}: {'; '.join(use['via'])}"
