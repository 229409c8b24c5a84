"""The ``sitebridge`` console script: small utilities around the federation.

Runs themselves are always ``flwr run .`` (see the README); these subcommands make
data, check a site folder offline, approve the app bundles a site serves, print a
run's report, audit an egress ledger and audit a model for membership inference.
Each body parses its arguments, calls one core function and returns an exit code.
Heavy imports stay inside the subcommands. Results are the command's output, on
stdout (errors on stderr); progress goes through SiteBridge's logging
(``core/logs.py``) at ``--log-level``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from core.logs import add_log_level_option, configure_logging, get_logger, log_level_of

if TYPE_CHECKING:
    from core.privacy.audit import MiaResult
    from core.privacy.ledger import LedgerEntry


def _synth(args: argparse.Namespace) -> int:
    from core.config import SyntheticScale, SyntheticShift
    from core.data.synthetic import write_federation

    names = write_federation(
        args.out,
        seed=args.seed,
        num_sites=args.sites,
        num_train_cases=args.cases,
        shift=SyntheticShift(args.shift),
        scale=SyntheticScale(args.scale),
        progress=get_logger("data").info,
    )
    print(f"wrote {len(names)} sites to {args.out} (default target {names[0]})")
    return 0


def _builtin(args: argparse.Namespace) -> int:
    from core.config import load_default_config
    from core.data.synthetic import ensure_builtin_federation

    federation = load_default_config().federation
    folder = ensure_builtin_federation(
        args.cache_dir,
        seed=federation.synthetic_seed,
        num_sites=federation.synthetic_sites,
        num_train_cases=federation.synthetic_cases,
        target_labelled=federation.synthetic_target_labelled,
        shift=federation.synthetic_shift,
        scale=federation.synthetic_scale,
        progress=get_logger("data").info,
    )
    print(f"built-in federation: {folder}")
    return 0


def _site_check(args: argparse.Namespace) -> int:
    from core.config import load_default_config
    from core.data.site import check_site

    try:
        overrides = parse_run_config(args.run_config)
        if args.num_classes is not None:
            overrides["data.num-classes"] = args.num_classes
        config = load_default_config(**overrides)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = check_site(args.site_dir, config, policy_path=args.policy)
    print("\n".join(result.to_lines()))
    for problem in result.problems:
        print(f"error: {problem}", file=sys.stderr)
    if result.ok:
        print(f"OK: {args.site_dir} passes the checks its SuperNode applies")
    return 0 if result.ok else 1


def _approvals_file(args: argparse.Namespace) -> Path:
    """The approvals file of the state dir named by --state-dir or --site-dir."""
    from core.privacy.approvals import APPROVALS_FILE

    state_dir = args.state_dir or args.site_dir / ".sitebridge"
    return Path(state_dir).expanduser() / APPROVALS_FILE


def _site_approve(args: argparse.Namespace) -> int:
    from core.privacy.approvals import (
        ApprovalError,
        BundleSummary,
        approve,
        parse_sha256,
        read_approvals,
        refused_bundle_path,
        revoke,
        summarise_bundle,
    )

    path = _approvals_file(args)
    try:
        if args.list:
            approvals = read_approvals(path)
            if not approvals:
                print(f"no bundle approved in {path}: the site refuses every run")
            for approval in approvals:
                note = f"  {approval.note}" if approval.note else ""
                print(
                    f"{approval.sha256}  {approval.approved_at}  {approval.source}"
                    f"{note}"
                )
            return 0
        if args.revoke is not None:
            revoked = revoke(path, args.revoke)
            print(f"revoked bundle {revoked.sha256} in {path}")
            return 0
        if args.bundle is None:
            print(
                "error: name a .fab file or its SHA-256 (or --list, --revoke)",
                file=sys.stderr,
            )
            return 1
        bundle = Path(args.bundle).expanduser()
        summary: BundleSummary | None
        if bundle.is_file():
            summary = summarise_bundle(bundle.read_bytes(), source=str(bundle))
            source = f"file {bundle.name}"
        else:
            digest = parse_sha256(args.bundle)
            kept = refused_bundle_path(path.parent, digest)
            summary = (
                summarise_bundle(kept.read_bytes(), source=str(kept))
                if kept.is_file()
                else None
            )
            if summary is not None and summary.sha256 != digest:
                print(f"error: {kept} does not hash to {digest}", file=sys.stderr)
                return 1
            source = "sha256"
        approval, new = approve(
            path,
            summary.sha256 if summary is not None else digest,
            source=source,
            note=args.note,
        )
    except (ApprovalError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    what = (
        f" ({summary.name} {summary.version}, {len(summary.files)} files)"
        if summary is not None
        else " (no copy of it here to show)"
    )
    verb = "approved" if new else "already approved"
    print(f"{verb}: bundle {approval.sha256}{what} in {path}")
    return 0


def find_report(path: Path) -> Path:
    """``path/report.md``, or that of the newest run folder inside ``path``."""
    if (path / "report.md").exists():
        return path / "report.md"
    runs = sorted(
        (run for run in path.glob("*/report.md")),
        key=lambda report: report.stat().st_mtime,
    )
    if not runs:
        raise FileNotFoundError(f"{path}: no report.md here or in any run folder below")
    return runs[-1]


def _report(args: argparse.Namespace) -> int:
    try:
        report = find_report(args.path)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{report}\n")
    print(report.read_text())
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from core.privacy.ledger import Ledger, verify_ledger

    ledgers = [args.ledger, *args.against]
    missing = [path for path in ledgers if not path.is_file()]
    if missing:
        print(f"error: no ledger at {missing[0]}", file=sys.stderr)
        return 2
    for path in ledgers:
        result = verify_ledger(path)
        if not result.ok:
            where = "" if path == args.ledger else f"{path}: "
            print(f"TAMPERED: {where}{result.problem}", file=sys.stderr)
            return 1
    print(f"OK: {verify_ledger(args.ledger).entries} entries, chain intact")
    if not args.against:
        return 0
    return _match_against_coordinator(
        Ledger(args.ledger).entries(),
        [entry for path in args.against for entry in Ledger(path).entries()],
        site=args.site,
    )


def _match_against_coordinator(
    site_entries: list[LedgerEntry], coordinator: list[LedgerEntry], *, site: str | None
) -> int:
    from core.privacy.ledger_match import coordinator_sites, match_ledgers

    known = coordinator_sites(coordinator)
    if site is None:
        own = {entry.sender for entry in site_entries}
        candidates = [name for name in known if name in own] or known
        if len(candidates) != 1:
            print(
                "error: name the site as the coordinator knows it with --site; the "
                f"coordinator ledger holds replies of {', '.join(known) or 'no site'}",
                file=sys.stderr,
            )
            return 2
        site = candidates[0]
    match = match_ledgers(site_entries, coordinator, site=site)
    for line in match.not_received:
        print(f"note: {line}")
    if not match.ok:
        for line in match.problems:
            print(f"MISMATCH: {line}", file=sys.stderr)
        return 1
    print(
        f"OK: all {match.anchors} replies the coordinator received from {site} are "
        "in this ledger, with the same hashes and digests"
    )
    return 0


def _audit_report(args: argparse.Namespace) -> int:
    from core.privacy.ledger import (
        Ledger,
        format_summary_html,
        format_summary_text,
        summarise_ledger,
        verify_ledger,
    )

    if not args.ledger.is_file():
        print(f"error: no ledger at {args.ledger}", file=sys.stderr)
        return 2
    result = verify_ledger(args.ledger)
    if not result.ok:
        print(
            f"error: not reporting on a broken chain: {result.problem}", file=sys.stderr
        )
        return 1
    entries = Ledger(args.ledger).entries()
    summary = summarise_ledger(entries, epsilon_budget=args.budget)
    print(format_summary_text(summary), end="")
    if args.html is not None:
        args.html.parent.mkdir(parents=True, exist_ok=True)
        args.html.write_text(format_summary_html(summary), encoding="utf-8")
        print(f"wrote {args.html}")
    return 0


_RUN_CONFIG_PAIR: Final = re.compile(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)")


def parse_run_config(text: str) -> dict[str, bool | int | float | str]:
    """Parse Flower's ``--run-config`` text (``'key=value ...'``, TOML values).

    A single ``.toml`` path is read as a run-config file, as ``flwr run`` does.

    Raises:
        ValueError: a value is not a TOML scalar, or the file cannot be read.

    Example:
        >>> parse_run_config('train.epochs=5 train.device="cpu"')
        {'train.epochs': 5, 'train.device': 'cpu'}
    """
    import tomllib

    if text.strip().endswith(".toml"):
        path = Path(text.strip())
        try:
            document = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"--run-config {path}: {error}") from None
        flat: dict[str, bool | int | float | str] = {}
        pending: list[tuple[str, object]] = list(document.items())
        while pending:
            key, value = pending.pop()
            if isinstance(value, dict):
                pending.extend((f"{key}.{name}", item) for name, item in value.items())
            elif isinstance(value, bool | int | float | str):
                flat[key] = value
            else:
                raise ValueError(f"--run-config {path}: {key} is not a scalar")
        return flat
    overrides: dict[str, bool | int | float | str] = {}
    for key, raw in _RUN_CONFIG_PAIR.findall(text):
        try:
            overrides[key] = tomllib.loads(f"value = {raw}")["value"]
        except tomllib.TOMLDecodeError:
            raise ValueError(
                f"--run-config: {key}={raw} is not a TOML value (quote strings: "
                f'{key}="{raw}")'
            ) from None
    return overrides


def _format_mia_table(results: Sequence[MiaResult]) -> str:
    lines = [
        f"{'attack':<16} {'AUC':>6}  {'95% CI':<15} {'members':>7} "
        f"{'non-members':>11} {'references':>10}"
    ]
    for result in results:
        interval = f"[{result.ci[0]:.3f}, {result.ci[1]:.3f}]"
        lines.append(
            f"{result.attack:<16} {result.auc:>6.3f}  {interval:<15} "
            f"{result.n_members:>7} {result.n_nonmembers:>11} "
            f"{result.references or '-':>10}"
        )
    return "\n".join(lines)


def _audit_mia(args: argparse.Namespace) -> int:
    import json

    from core.config import load_default_config
    from core.privacy.audit import MiaAttack, audit_site, read_audit_weights

    try:
        config = load_default_config(**parse_run_config(args.run_config))
        attacks = list(MiaAttack) if args.attack == "all" else [MiaAttack(args.attack)]
        weights = read_audit_weights(args.model, config)
        results = audit_site(
            args.site,
            weights,
            config,
            attacks=attacks,
            references=args.references,
            resamples=args.bootstrap,
            seed=args.seed,
            progress=get_logger("audit").info,
        )
    except ValueError as error:  # SiteDataError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_format_mia_table(results))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "site": str(args.site),
            "model": str(args.model),
            "results": [result.to_dict() for result in results],
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of all subcommands."""
    parser = argparse.ArgumentParser(
        prog="sitebridge", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    synth = commands.add_parser(
        "synth", help="write a synthetic federation in the site layout"
    )
    synth.add_argument("out", type=Path, help="folder to create")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--sites", type=int, default=6)
    synth.add_argument(
        "--cases",
        type=int,
        default=12,
        help="training cases per site, all labelled (plus 6 evaluation cases)",
    )
    synth.add_argument(
        "--shift",
        choices=("wide", "mild"),
        default="wide",
        help="wide: sites over the whole continuum, past the contrast inversion; "
        "mild: all before it, each with its own scanner",
    )
    synth.add_argument(
        "--scale",
        choices=("small", "hospital"),
        default="small",
        help="small: 10 x 64 x 64 MR-like volumes at 1.5 x 1.5 x 3 mm; hospital: "
        "hospital-sized anisotropic volumes, MR-like sites and a CT-like last site "
        "in Hounsfield units",
    )
    synth.set_defaults(run=_synth)
    builtin = commands.add_parser(
        "builtin", help="generate (once) the built-in federation the demo runs on"
    )
    builtin.add_argument("--cache-dir", type=Path, default=Path("data"))
    builtin.set_defaults(run=_builtin)
    site = commands.add_parser("site", help="site folder utilities")
    site_commands = site.add_subparsers(dest="site_command", required=True)
    check = site_commands.add_parser(
        "check",
        help="validate a site folder offline, as its SuperNode would",
        description="Reads every case of every split with the checks the site's "
        "handlers apply (readable and complete files, image/label geometry, label "
        "classes, finite intensities), reads and applies the site's policy, prints a "
        "summary, and exits 1 naming the file and the problem if anything fails.",
    )
    check.add_argument("site_dir", type=Path)
    check.add_argument(
        "--policy",
        type=Path,
        help="the policy file the node is started with (node config 'policy'); "
        "default: <site_dir>/policy.toml if present",
    )
    check.add_argument(
        "--run-config",
        default="",
        help="overrides of the run-config defaults the federation runs with, as for "
        "flwr run: 'data.num-classes=3' or a .toml file",
    )
    check.add_argument(
        "--num-classes",
        type=int,
        help="classes labels must lie in (default: the run config's data.num-classes)",
    )
    check.set_defaults(run=_site_check)
    approve = site_commands.add_parser(
        "approve",
        help="approve an app bundle (a .fab file or its SHA-256) this site serves",
        description="The site's SuperNode (with sitebridge-serve) answers a run only "
        "when the SHA-256 of the run's app bundle is approved here; it then runs the "
        "SiteBridge installed at the site, never the bundle's code. Build the "
        "release you reviewed with `flwr build` and approve that file, or approve the "
        "SHA-256 a refusal named after reviewing the copy kept in "
        "<state-dir>/bundles/.",
    )
    where = approve.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--state-dir",
        type=Path,
        help="the site's state dir (its SuperNode's --state-dir)",
    )
    where.add_argument(
        "--site-dir",
        type=Path,
        help="the site folder, when its state dir is <site-dir>/.sitebridge",
    )
    approve.add_argument(
        "bundle", nargs="?", help="a .fab file, or the SHA-256 of a bundle"
    )
    approve.add_argument("--note", default="", help="who reviewed it, which release")
    approve.add_argument(
        "--list", action="store_true", help="list the approved bundles"
    )
    approve.add_argument("--revoke", metavar="SHA256", help="revoke an approval")
    approve.set_defaults(run=_site_approve)
    report = commands.add_parser("report", help="print a run's report.md")
    report.add_argument(
        "path",
        type=Path,
        nargs="?",
        default=Path("runs"),
        help="a run folder, or a runs folder (newest run)",
    )
    report.set_defaults(run=_report)
    audit = commands.add_parser("audit", help="check and summarise an egress ledger")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser(
        "verify",
        help="exit 0 if the ledger's hash chain is intact (and, with --against, "
        "matches the coordinator's), else name the entry",
        description="Checks the hash chain. With --against, also checks a site's "
        "ledger against the anchors its replies carried to the coordinator: a "
        "rewritten or truncated site ledger no longer matches them.",
    )
    verify.add_argument("ledger", type=Path, help="a ledger.jsonl file")
    verify.add_argument(
        "--against",
        type=Path,
        action="append",
        default=[],
        help="a coordinator ledger (runs/<run-id>/ledger.jsonl); repeat for runs",
    )
    verify.add_argument(
        "--site",
        help="the site's name at the coordinator (default: the site ledger's own, "
        "or the only site in the coordinator ledger)",
    )
    verify.set_defaults(run=_audit_verify)
    summary = audit_commands.add_parser(
        "report", help="summarise what left, per run and per action, and epsilon used"
    )
    summary.add_argument("ledger", type=Path, help="a ledger.jsonl file")
    summary.add_argument("--html", type=Path, help="also write an HTML page here")
    summary.add_argument(
        "--budget", type=float, help="the site's total epsilon budget to compare with"
    )
    summary.set_defaults(run=_audit_report)
    mia = audit_commands.add_parser(
        "mia",
        help="membership-inference audit of a model trained on a site's cases",
        description="Members are the site's labelled imagesTr cases, non-members its "
        "labelled imagesTs cases; reports each attack's AUC with a bootstrap 95% CI.",
    )
    mia.add_argument("--site", type=Path, required=True, help="the site folder")
    mia.add_argument(
        "--model", type=Path, required=True, help="weights (.npz) trained on the site"
    )
    mia.add_argument(
        "--attack",
        choices=("loss-threshold", "calibrated-loss", "all"),
        default="all",
    )
    mia.add_argument(
        "--references",
        type=int,
        default=4,
        help="reference models trained for calibrated-loss (default 4)",
    )
    mia.add_argument(
        "--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)"
    )
    mia.add_argument("--seed", type=int, default=0)
    mia.add_argument(
        "--run-config",
        default="",
        help="overrides of the run-config defaults the model was trained with, as "
        "for flwr run: 'model.channels=\"16,32\" train.epochs=5' or a .toml file",
    )
    mia.add_argument("--json", type=Path, help="also write the results here")
    mia.set_defaults(run=_audit_mia)
    add_log_level_option(
        parser,
        synth,
        builtin,
        site,
        check,
        approve,
        report,
        audit,
        verify,
        summary,
        mia,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sitebridge`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging(log_level_of(args))
    result: int = args.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
