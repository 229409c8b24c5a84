"""The run report: ``report.json``, ``report.md`` and PNG plots in the run folder.

``report.json`` holds ``sites`` (name, role — target, source, failed (a source that
did not deliver a model) or idle — and cases), ``affinity`` (SeqTran: the profiles'
figures, the distance matrix, the chosen transfer path and its fine-tuning steps,
pictured in ``affinity_path.png``), ``transferability`` (``dtm`` per
candidate, each candidate's ``candidates`` label use, and TGMA's ``label_free``
choice among the label-free candidates — ``main``, ``aux``, ``weights`` — and its
``few_label`` choice among all, if any), ``evaluation.dice`` with one entry per
candidate alone (``source:<name>``), ``uniform`` (of the label-free candidates),
``tgma`` (plus ``tgma-main``, and ``tgma-pair`` when TGMA predicts by its voters'
average; ``tgma-few-label`` and the same parts when a candidate used the target's
labels) and HD95, ``evaluation.segmented``, ``segmentations`` and
``segmentations_run``: the predictor whose segmentations the target wrote at home,
how many, and under which ``segmentations/run-<id>/`` of its state folder,
``evaluation.groups``: each
predictor's group, ``label-free`` or ``few-label``, and ``evaluation.label_use``:
what a few-label one used (docs/methods.md#label-free-and-few-label; ``report.md``
shows one table per group, never mixed),
``consensus`` (per label source: mean data parameter, STAPLE sensitivity, agreement
with the DeepSTAPLE consensus; per method: consensus Dice on the target's evaluation
labels; Spearman correlations of label quality), ``evaluation.postprocessed``,
``dice_raw`` and ``hd95_raw_mm`` (the predictors the target post-processed, keeping
the largest connected component per class, and their figures before it; each
source's decision is in ``source_training``, and ``report.md`` shows both in its
post-processing section), ``semisup`` (the target's UG-MCL
refinement and the federated rounds: Dice per site after each round, plotted in
``semisup_dice.png``), the per-phase timings, who was
missing, ``privacy`` (per site: what it released per
action, the policy it applied and the epsilon it spent, from the coordinator's ledger
and the sites' replies) and the resolved config.
"""

from server.report.document import (
    build_report,
    format_markdown,
    plot_report,
    write_report,
)
from server.report.privacy import build_privacy_section

__all__ = [
    "build_privacy_section",
    "build_report",
    "format_markdown",
    "plot_report",
    "write_report",
]
