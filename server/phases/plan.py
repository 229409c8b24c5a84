"""The plan phase: each site's fingerprint, then one resolution plan for the run.

Every site that said hello is asked for its fingerprint (``query.fingerprint``):
aggregates of its training images, never an image. The coordinator derives the plan
(:func:`core.planning.rules.derive_plan`), saves it as ``plan.json`` in the run folder
and sends its values with every later request; each site applies them where the run
config leaves a value to the plan (docs/planning.md). A site that refuses or fails is
recorded as missing and the plan stands on the others; with no fingerprint at all the
run goes on with its own settings, unless it left one to the plan.
"""

from __future__ import annotations

from collections.abc import Mapping

from core import protocol
from core.config import RunConfig
from core.planning.fingerprint import SiteFingerprint
from core.planning.rules import ResolutionPlan, apply_plan, derive_plan
from server import records
from server.coordinator import Coordinator, PhaseError, SiteInfo, names_by_site
from server.results import PlanResult

PLAN_FILE = "plan.json"


def unplanned_values(config: RunConfig) -> list[str]:
    """The run-config keys the run leaves to a plan it does not have.

    Example:
        >>> from core.config import load_default_config
        >>> unplanned_values(load_default_config(**{"data.image-size": 0}))
        ['data.image-size = 0']
    """
    left = []
    if config.data.image_size == 0:
        left.append("data.image-size = 0")
    if config.train.batch_size == 0:
        left.append("train.batch-size = 0")
    return left


def settings_of(plan: ResolutionPlan) -> protocol.PlanSettings:
    """The plan's values as every later request carries them."""
    return protocol.PlanSettings(
        image_size=plan.image_size,
        batch_size=plan.batch_size,
        spacing_mm=plan.in_plane_spacing_mm,
        ct_window=plan.ct_window or None,
    )


def apply(coordinator: Coordinator, result: PlanResult) -> RunConfig:
    """Make ``result``'s plan the run's: the coordinator's config and every request.

    Raises:
        PhaseError: the run leaves a value to the plan and there is none.
    """
    if not result.plan:
        left = unplanned_values(coordinator.config)
        if left:
            raise PhaseError(
                f"plan: the run config leaves {', '.join(left)} to the resolution "
                "plan, but no site released a fingerprint "
                f"(missing: {result.missing or 'none asked'}); set the value",
                phase="plan",
                missing=result.missing,
            )
        return coordinator.config
    plan = ResolutionPlan.from_document(result.plan)
    coordinator.plan = settings_of(plan)
    coordinator.config = apply_plan(
        coordinator.config,
        image_size=plan.image_size,
        batch_size=plan.batch_size,
        spacing_mm=plan.in_plane_spacing_mm,
        ct_window=plan.ct_window,
    )
    return coordinator.config


def run(coordinator: Coordinator, sites: Mapping[int, SiteInfo]) -> PlanResult:
    """Ask every site for its fingerprint; derive, save and return the plan."""
    config = coordinator.config
    coordinator.log(f"plan: fingerprints of {sorted(s.name for s in sites.values())}")
    replies = coordinator.ask(
        {node: records.build_request() for node in sites}, protocol.FINGERPRINT
    )
    failed = dict(replies.failed)
    fingerprints: dict[str, SiteFingerprint] = {}
    released: dict[str, dict[str, object]] = {}
    for node, reply in replies.ok.items():
        site = sites[node]
        try:
            found = protocol.FingerprintReply.from_fields(
                records.read_metrics(reply.content)
            )
        except ValueError as error:
            failed[node] = f"malformed reply: {error}"
            continue
        released[site.name] = dict(found.to_fields())
        fingerprints[site.name] = SiteFingerprint(
            modality=site.hello.modality,
            num_images=found.num_images,
            num_labelled=found.num_labelled,
            spacing_mm=(found.spacing_mm[0], found.spacing_mm[1], found.spacing_mm[2]),
            shape=(found.shape[0], found.shape[1], found.shape[2]),
            ct_intensities=found.ct_intensities,
        )
    missing = names_by_site(sites, failed)
    for name, reason in sorted(missing.items()):
        coordinator.warn(f"plan: no fingerprint from {name}: {reason}")
    plan_document: dict[str, object] = {}
    if fingerprints:
        plan = derive_plan(fingerprints, plan=config.plan, strides=config.model.strides)
        plan_document = plan.to_document()
        for line in plan.rules:
            coordinator.log(f"plan: {line}")
    result = PlanResult(
        fingerprints=released,
        plan=plan_document,
        applied={},
        missing=missing,
    )
    if plan_document:
        planned = ResolutionPlan.from_document(plan_document)
        applied = apply_plan(
            config,
            image_size=planned.image_size,
            batch_size=planned.batch_size,
            spacing_mm=planned.in_plane_spacing_mm,
            ct_window=planned.ct_window,
        )
        result = PlanResult(
            fingerprints=released,
            plan=plan_document,
            applied={
                "image-size": applied.data.image_size,
                "batch-size": applied.train.batch_size,
                "ct-window": list(applied.data.ct_window),
                "resample": applied.data.resample.value,
                "spacing-mm": applied.data.spacing_mm,
                "slice-axis": applied.data.slice_axis.value,
            },
            missing=missing,
        )
        coordinator.store.write_json(
            PLAN_FILE, {**plan_document, "applied": result.applied}
        )
    coordinator.store.save_result(result)
    return result
