"""A site folder as its SuperNode sees it: the policy it applies, and its data checked.

Owns what a node (``clients/site.py``, per message) and ``sitebridge site check``
(offline) both do with a site folder — find and read the site's policy, apply it to
the run's privacy settings (:func:`read_applied_policy`), and read and check every
case (:func:`check_site`) — so the offline check is exactly the node's; and how a
site's error text is made fit to leave it (:func:`redact_site_text`: cases by index,
never a file name or an absolute path). Pure core: never imports flwr, clients or
server.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Final

from core.config import PrivacyConfig, RunConfig
from core.data.dataset import SiteDataError, SiteSummary, index_site, validate_site
from core.privacy.policy import (
    POLICY_FILE,
    AppliedPolicy,
    PolicyError,
    SitePolicy,
    default_policy,
    read_policy,
    resolve_policy,
)

DEFAULT_POLICY_SOURCE: Final = "defaults"
# Folders of a site whose file names are case names (and so often patient ids).
_CASE_FOLDERS: Final = (
    "imagesTr",
    "labelsTr",
    "imagesTs",
    "labelsTs",
    "atlases/imagesTr",
    "atlases/labelsTr",
)
_VOLUME_SUFFIX: Final = re.compile(r"\.(nii\.gz|nii|nrrd|mha|mhd|dcm)$", re.IGNORECASE)
_CHANNEL_SUFFIX: Final = re.compile(r"_\d{4}$")
# An absolute path: a "/" that starts a token (not one after "<site>"), then anything
# up to a space, quote, colon or bracket.
_ABSOLUTE_PATH: Final = re.compile(r"(?<![\w.>])/[^\s'\":()\[\]]+")


def _case_names(site_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The site's case ids (sorted) and every case file name -> its case id.

    Names only: nothing is read, so this works on a damaged site too.
    """
    files: dict[str, str] = {}
    for folder in _CASE_FOLDERS:
        path = Path(site_dir) / folder
        if not path.is_dir():
            continue
        for entry in path.iterdir():
            stem = _CHANNEL_SUFFIX.sub("", _VOLUME_SUFFIX.sub("", entry.name))
            if stem:
                files[entry.name] = stem
    return sorted(set(files.values())), files


def redact_site_text(
    text: str, *, site_dir: Path | None, state_dir: Path | None = None
) -> str:
    """``text`` fit to leave the site: cases by index, no file names, no paths.

    At hospitals a case's file name is often a patient identifier, and a path says how
    the site's disks are laid out; neither may leave in an error reply. Every case
    name found in the site's case folders (and every file name there) becomes
    ``case #<k>``, ``k`` its position among the site's case ids in sorted order; the
    site folder becomes ``<site>``, the state folder ``<state>``, and any other
    absolute path ``<path>``. With no site folder (None) only paths are redacted.
    The site's own log keeps the original text.

    Example:
        >>> import tempfile
        >>> site = Path(tempfile.mkdtemp()) / "hospital"
        >>> (site / "imagesTr").mkdir(parents=True)
        >>> _ = (site / "imagesTr" / "smith-1984_0000.nii.gz").write_bytes(b"")
        >>> redact_site_text(
        ...     f"{site}/imagesTr/smith-1984_0000.nii.gz: case 'smith-1984' is bad; "
        ...     "see /etc/sitebridge/x.toml", site_dir=site)
        "<site>/imagesTr/case #0: case 'case #0' is bad; see <path>"
        >>> import shutil; shutil.rmtree(site.parent)
    """
    case_ids, files = ([], {}) if site_dir is None else _case_names(site_dir)
    index = {case_id: position for position, case_id in enumerate(case_ids)}
    names = {name: f"case #{index[case_id]}" for name, case_id in files.items()}
    names.update({case_id: f"case #{index[case_id]}" for case_id in case_ids})
    folders = {} if site_dir is None else {str(Path(site_dir)): "<site>"}
    if state_dir is not None:
        folders[str(Path(state_dir))] = "<state>"
    with_resolved = dict(folders)
    for folder, marker in folders.items():
        resolved = str(Path(folder).resolve())
        with_resolved.setdefault(resolved, marker)
    for folder in sorted(with_resolved, key=len, reverse=True):
        text = text.replace(folder, with_resolved[folder])
    text = _ABSOLUTE_PATH.sub("<path>", text)
    for name in sorted(names, key=len, reverse=True):
        text = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", names[name], text)
    return text


def read_site_policy(
    site_dir: Path, *, policy_path: Path | None = None
) -> tuple[SitePolicy, str]:
    """Read the site's own policy and say where it came from.

    Args:
        site_dir: the site folder.
        policy_path: the policy file the node was started with (node config
            ``policy``); when None, ``<site_dir>/policy.toml`` if present, else the
            safe defaults of ``deploy/policy.template.toml``.

    Returns:
        The policy and its source: the file read, or ``"defaults"``.

    Raises:
        PolicyError: ``policy_path`` names no readable file, or the policy file is
            malformed (naming the file and the TOML key or line).
    """
    if policy_path is not None:
        if not policy_path.is_file():
            raise PolicyError(
                "the node config's 'policy' names no readable file",
                source=str(policy_path),
            )
        return read_policy(policy_path), str(policy_path)
    path = Path(site_dir) / POLICY_FILE
    if path.is_file():
        return read_policy(path), str(path)
    return default_policy(), DEFAULT_POLICY_SOURCE


def read_applied_policy(
    site_dir: Path, privacy: PrivacyConfig, *, policy_path: Path | None = None
) -> tuple[AppliedPolicy, str]:
    """Read the site's policy and apply the run's privacy settings (stricter wins).

    Args:
        site_dir: the site folder.
        privacy: the run's privacy settings.
        policy_path: as for :func:`read_site_policy`.

    Returns:
        The applied policy and the source of the site's own policy.

    Raises:
        PolicyError: the policy file is missing or malformed, or the merge is
            invalid (DP required with neither noise nor target ε); the message names
            the policy's source.
    """
    site_policy, source = read_site_policy(site_dir, policy_path=policy_path)
    try:
        applied = resolve_policy(
            site_policy,
            run_dp_required=privacy.dp,
            run_noise_multiplier=privacy.noise_multiplier or None,
            run_target_epsilon=privacy.target_epsilon or None,
            run_max_reply_mb=privacy.max_reply_mb or None,
            run_delta=privacy.delta,
        )
    except PolicyError as error:
        raise PolicyError(
            error.detail, source=f"{source} with the run's privacy settings"
        ) from None
    return applied, source


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SiteCheck:
    """What :func:`check_site` found.

    Attributes:
        site_dir: the site folder checked.
        summary: the data summary, or None when the data failed its checks.
        policy: the policy the node would apply, or None when it failed to load.
        policy_source: the policy file read, ``"defaults"``, or "" when it failed.
        problems: one line per problem, each naming the file and what is wrong.
    """

    site_dir: Path
    summary: SiteSummary | None
    policy: AppliedPolicy | None
    policy_source: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        """Whether a node would serve this site (no problem found)."""
        return not self.problems

    def to_lines(self) -> list[str]:
        """Return the readable summary of what passed (problems are not included)."""
        lines = (
            [f"site {self.site_dir.name}: data not summarised (see the errors)"]
            if self.summary is None
            else self.summary.to_lines()
        )
        if self.policy is not None:
            policy = self.policy
            lines += [
                f"  policy: {self.policy_source}",
                f"    answers: {', '.join(sorted(policy.answers)) or 'nothing'}",
                f"    LFTM release: {policy.lftm_release.value}; weights may leave: "
                f"{'yes' if policy.weights_may_leave else 'no'}; DP-SGD required: "
                f"{'yes' if policy.dp_required else 'no'}; epsilon budget "
                f"{policy.epsilon_budget:g} at delta {policy.delta:g}",
            ]
        return lines


def check_site(
    site_dir: Path, config: RunConfig, *, policy_path: Path | None = None
) -> SiteCheck:
    """Run a node's checks on a site folder offline: its policy and every case.

    The policy is read and applied as the node does for every message; every case of
    every split is read with the checks the handlers apply to the cases they use
    (:func:`core.data.dataset.read_case`), against ``config.data.num_classes``.

    Args:
        site_dir: the site folder.
        config: the run config the node would serve (classes, privacy settings).
        policy_path: the node config's ``policy`` file, if it names one.

    Returns:
        The summary, the applied policy, and every problem found (the first bad case
        of the data, and the policy's problem).
    """
    problems: list[str] = []
    policy: AppliedPolicy | None = None
    source = ""
    try:
        policy, source = read_applied_policy(
            site_dir, config.privacy, policy_path=policy_path
        )
    except (PolicyError, OSError) as error:
        problems.append(str(error))
    summary: SiteSummary | None = None
    try:
        summary = validate_site(
            index_site(site_dir), num_classes=config.data.num_classes
        )
    except SiteDataError as error:
        problems.append(str(error))
    return SiteCheck(
        site_dir=Path(site_dir),
        summary=summary,
        policy=policy,
        policy_source=source,
        problems=tuple(problems),
    )
