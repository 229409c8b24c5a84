"""Resolve the site a SuperNode serves, its policy and its state, from the Context.

Deployment: ``node_config["site-dir"]`` (``flower-supernode --node-config``).
Simulation: Flower 1.39 gives only ``partition-id``/``num-partitions``, so partition
``i`` serves the ``i``-th site folder (sorted by name) of the run's federation folder.

The site's policy is ``node_config["policy"]`` when set, else ``<site-dir>/policy.toml``
when present, else the safe defaults of ``deploy/policy.template.toml``; it is merged
with the run's privacy settings (the stricter wins) by ``core.data.site``, the same code
``sitebridge site check`` runs offline. Settings the site owns override the run's
here, once, so every handler sees them: the cap on slices per case and the
semi-supervised labelled fraction. The site's state (ledger, privacy accountant, query
book) lives in ``node_config["state-dir"]``, default ``<site-dir>/.sitebridge/``.
Every line the site logs goes through its own logger, ``sitebridge.site.<name>``, so
each names the site.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Final

from flwr.app import Context, Message

from core import protocol
from core.config import IntensityNormalisation, RunConfig, load_run_config
from core.data.dataset import SiteDataError, index_site, list_site_dirs
from core.data.site import DEFAULT_POLICY_SOURCE, read_applied_policy
from core.data.synthetic import resolve_federation_dir
from core.logs import get_logger
from core.planning.rules import apply_plan, resolve_normalisation
from core.privacy.dp import ACCOUNTANT_FILE
from core.privacy.ledger import Ledger
from core.privacy.limits import QUERIES_FILE, cap_slices_per_case
from core.privacy.policy import AppliedPolicy

SITE_DIR_KEY: Final = "site-dir"
PARTITION_KEY: Final = "partition-id"
POLICY_KEY: Final = "policy"
STATE_DIR_KEY: Final = "state-dir"
DEFAULT_STATE_DIR: Final = ".sitebridge"  # inside the site folder
LEDGER_FILE: Final = "ledger.jsonl"
SEGMENTATIONS_DIR: Final = "segmentations"  # under the state folder, one per run


def segmentations_dir(state_dir: Path, run_id: int) -> Path:
    """Where a run's segmentations of the site's images are written (never sent).

    The run id is Flower's integer, so nothing the coordinator names becomes a path.

    Example:
        >>> segmentations_dir(Path("/data/A/.sitebridge"), 7).as_posix()
        '/data/A/.sitebridge/segmentations/run-7'
    """
    return state_dir / SEGMENTATIONS_DIR / f"run-{int(run_id)}"


@dataclasses.dataclass(frozen=True, slots=True)
class SiteLocation:
    """The folder a node serves and its name (the folder's name)."""

    name: str
    directory: Path

    def logger(self, part: str = "") -> logging.Logger:
        """The site's logger, ``sitebridge.site.<name>`` (``.<part>`` when given).

        Example:
            >>> SiteLocation("B", Path("/data/B")).logger("guard").name
            'sitebridge.site.B.guard'
        """
        return get_logger(".".join(filter(None, ("site", self.name, part))))


def resolve_site(context: Context, config: RunConfig) -> SiteLocation:
    """Return the site this node serves.

    Raises:
        SiteDataError: the node config names no site, or the partition has no folder.
    """
    node_config = context.node_config
    if SITE_DIR_KEY in node_config:
        directory = Path(str(node_config[SITE_DIR_KEY])).expanduser()
        return SiteLocation(name=directory.name, directory=directory)
    if PARTITION_KEY not in node_config:
        raise SiteDataError(
            f"node config has neither {SITE_DIR_KEY!r} (deployment) nor "
            f"{PARTITION_KEY!r} (simulation); start the SuperNode with "
            f"--node-config '{SITE_DIR_KEY}=\"/path/to/site\"'"
        )
    partition = int(node_config[PARTITION_KEY])
    sites = list_site_dirs(resolve_federation_dir(config.federation))
    if not 0 <= partition < len(sites):
        raise SiteDataError(
            f"simulation partition {partition} has no site: the federation has "
            f"{len(sites)} site folders; run with num-supernodes={len(sites)}"
        )
    return SiteLocation(name=sites[partition].name, directory=sites[partition])


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteSetup:
    """Everything a handler needs about its site for one message."""

    config: RunConfig  # the run's, with the site-owned settings applied
    site: SiteLocation
    policy: AppliedPolicy  # the stricter of the site's policy and the run config
    policy_source: str  # the policy file read, or "defaults"
    state_dir: Path
    started: float  # time.monotonic() when the message's setup was resolved

    @property
    def policy_name(self) -> str:
        """The policy's source as a reply may name it (never the file's path)."""
        return (
            "the default policy"
            if self.policy_source == DEFAULT_POLICY_SOURCE
            else "the site's policy"
        )

    @property
    def deadline(self) -> float | None:
        """``time.monotonic()`` past which the request must stop (None: no cap)."""
        seconds = self.policy.limits.max_request_seconds
        return self.started + seconds if seconds else None

    @property
    def query_book_path(self) -> Path:
        """The site's query book (query units per run, against its budget)."""
        return self.state_dir / QUERIES_FILE

    @property
    def ledger(self) -> Ledger:
        """The site's egress ledger."""
        return Ledger(self.state_dir / LEDGER_FILE)

    @property
    def accountant_path(self) -> Path:
        """The site's privacy accountant file (cumulative epsilon)."""
        return self.state_dir / ACCOUNTANT_FILE


def resolve_state_dir(context: Context, site: SiteLocation) -> Path:
    """``node_config["state-dir"]``, or ``<site-dir>/.sitebridge``."""
    if STATE_DIR_KEY in context.node_config:
        return Path(str(context.node_config[STATE_DIR_KEY])).expanduser()
    return site.directory / DEFAULT_STATE_DIR


def resolve_policy_path(context: Context) -> Path | None:
    """``node_config["policy"]``, or None when the node was started without one."""
    if POLICY_KEY in context.node_config:
        return Path(str(context.node_config[POLICY_KEY])).expanduser()
    return None


def resolve_setup(context: Context, message: Message | None = None) -> SiteSetup:
    """Parse the run config, find the site, read and apply its policy and the plan.

    The request's resolution plan (``PLAN_KEY``), when it carries one, fills the
    values the run config leaves to it (:func:`apply_request_plan`); the site's
    limits then hold the planned sizes as they hold the run's.

    Raises:
        ValueError: a bad run-config value (naming the key), or a bad plan.
        SiteDataError: no site for this node.
        PolicyError: a missing or malformed policy file.
    """
    config = load_run_config(context.run_config)
    site = resolve_site(context, config)
    if not site.directory.is_dir():
        # Checked before anything is written: the ledger would create the folder.
        raise SiteDataError(f"{site.directory}: site folder not found")
    applied, source = read_applied_policy(
        site.directory, config.privacy, policy_path=resolve_policy_path(context)
    )
    config = apply_site_settings(config, applied)
    if message is not None:
        config = apply_request_plan(config, message, site.directory)
    return SiteSetup(
        config=config,
        site=site,
        policy=applied,
        policy_source=source,
        state_dir=resolve_state_dir(context, site),
        started=time.monotonic(),
    )


def apply_site_settings(config: RunConfig, policy: AppliedPolicy) -> RunConfig:
    """``config`` with the settings the site owns: slices per case, labelled share."""
    capped = cap_slices_per_case(config, policy.limits)
    return dataclasses.replace(
        capped,
        semisup=dataclasses.replace(
            capped.semisup, labelled_fraction=policy.semisup_labelled_fraction
        ),
    )


def locate_state_leniently(context: Context) -> tuple[SiteLocation, Path] | None:
    """The site and its state folder even when the run config is bad; else None.

    Used to ledger the error reply to a message whose setup failed: the node config
    names the site in deployment; in simulation the federation folder comes from the
    run config, which is tried as it is. A site folder that does not exist is still
    returned when the node config names the state folder (it is then written there,
    and no site folder is created).
    """
    node_config = context.node_config
    try:
        if SITE_DIR_KEY in node_config:
            directory = Path(str(node_config[SITE_DIR_KEY])).expanduser()
            site = SiteLocation(name=directory.name, directory=directory)
        else:
            site = resolve_site(context, load_run_config(context.run_config))
    except (ValueError, OSError):
        return None
    if not site.directory.is_dir() and STATE_DIR_KEY not in node_config:
        return None
    return site, resolve_state_dir(context, site)


def apply_request_plan(
    config: RunConfig, message: Message, site_dir: Path
) -> RunConfig:
    """``config`` with the request's plan applied and ``auto`` normalisation resolved.

    The plan fills only what the run config leaves to it (``data.image-size = 0``,
    ``train.batch-size = 0``, an empty ``data.ct-window``); the coordinator cannot
    override a value the run sets. ``data.normalisation = "auto"`` becomes ``ct``
    at a site whose ``dataset.json`` names CT and which has a CT window, else
    ``zscore``: the site's own modality decides, not anything the request says.

    Raises:
        ValueError: the request's plan is malformed (naming the plan field), or the
            planned values do not fit the run's model (naming the key).
    """
    record = message.content.config_records.get(protocol.PLAN_KEY)
    if record is not None:
        valid = protocol.record_keys(protocol.PlanSettings)
        unknown = sorted(set(record) - set(valid))
        if unknown:
            raise ValueError(
                f"the request's resolution plan has unknown fields {unknown}; valid "
                f"fields: {', '.join(valid)}"
            )
        try:
            plan = protocol.PlanSettings.from_fields(record)
            config = apply_plan(
                config,
                image_size=plan.image_size,
                batch_size=plan.batch_size,
                spacing_mm=plan.spacing_mm,
                ct_window=plan.ct_window or (),
            )
        except ValueError as error:
            raise ValueError(f"the request's resolution plan: {error}") from None
    if config.data.normalisation is not IntensityNormalisation.AUTO:
        return config
    try:
        modality = index_site(site_dir).modality
    except SiteDataError:
        return config  # the handler reports the site's data problem
    return resolve_normalisation(config, modality)
