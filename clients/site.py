"""Resolve which site folder this SuperNode serves, from its Flower Context.

Deployment: ``node_config["site-dir"]`` (``flower-supernode --node-config``).
Simulation: Flower 1.39 gives only ``partition-id``/``num-partitions``, so partition
``i`` serves the ``i``-th site folder (sorted by name) of the run's federation folder.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Final

from flwr.app import Context

from core.config import RunConfig
from core.data import SiteDataError, list_site_dirs
from core.synthetic import resolve_federation_dir

SITE_DIR_KEY: Final = "site-dir"
PARTITION_KEY: Final = "partition-id"


@dataclasses.dataclass(frozen=True, slots=True)
class SiteLocation:
    """The folder a node serves and its name (the folder's name)."""

    name: str
    directory: Path


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
