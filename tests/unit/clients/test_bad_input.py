"""Bad input at a site, class by class, through the site's real ClientApp.

Issue 4 item 5 and docs/architecture.md#site-folders: an unreadable or truncated
image, an image/label geometry mismatch, labels outside the declared classes, NaN/inf
intensities, an empty or missing site folder, a malformed policy file and a model
whose parameters do not match the manifest each get an error reply (code
``SITE_ERROR_CODE``) whose reason names the file (or parameter) and the problem.

Every case runs through ``clients.app.app``, so the egress guard runs too, on a copy
of site B whose state (ledger, DP accountant) lives in its own folder. Each case:

1. seeds the state: one released ``query.hello`` in the ledger, and an accountant
   holding a DP history (the policy requires DP-SGD, so ``train.source`` would
   spend from it);
2. damages the copy and sends one message;
3. checks the error reply (the file by its place in the site, the case by index:
   no absolute path and no case name leaves), that nothing is half-written (no
   temporary file, the ledger verifies and holds the one error entry, and the
   accountant is unchanged);
4. repairs the input and sends the next message to the same app: a normal reply,
   because the node keeps serving (one case per action sends that action again).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from clients import records
from clients.app import app as site_app
from core import protocol
from core.config import ConfigValue, RunConfig, load_run_config
from core.data.site import redact_site_text
from core.privacy.dp import (
    ACCOUNTANT_FILE,
    AccountantState,
    read_accountant_state,
    write_accountant_state,
)
from core.privacy.egress import measure_error
from core.privacy.ledger import Ledger, verify_ledger
from core.training.job import build_initial_weights
from core.training.networks import Arrays
from tests.unit.bad_input import BAD_SITES, SITE, BadSite, copy_site
from tests.unit.clients.messages import (
    DP_POLICY,
    MESSAGE_ID,
    assert_site_error,
    build_candidates,
    build_message,
    build_site_context,
    policy_text,
    reason_of,
)

LEDGER_FILE: Final = "ledger.jsonl"
SEED_HISTORY: Final = AccountantState(((2.0, 0.01, 10),))
MANIFEST: Final = "weights do not match the model manifest"
SOURCE, LFTM, ADAPT, EVALUATE, HELLO = (
    protocol.TRAIN_SOURCE,
    protocol.LFTM,
    protocol.ADAPT,
    protocol.EVALUATE,
    protocol.HELLO,
)


# ------------------------------------------------------------------------- sandbox


@dataclasses.dataclass
class Sandbox:
    """One site under test and what the coordinator sends it.

    Attributes:
        federation: the shared federation (never written).
        site: this test's copy of site B, which the damage breaks.
        state: the site's state folder (ledger, accountant).
        policy: the node config's policy file, or None for ``<site>/policy.toml``.
        candidates: the ``model.<name>`` weights of lftm, adapt and evaluate.
        initial: the initial weights of train.source.
        good_weights: the run's seeded initial weights, for repairs.
    """

    federation: Path
    site: Path
    state: Path
    policy: Path | None
    candidates: dict[str, Arrays]
    initial: Arrays
    good_weights: Arrays

    def context(self, run_config: Mapping[str, ConfigValue]) -> Context:
        return build_site_context(run_config, self.site, self.state, policy=self.policy)

    def request(self, message_type: str, message_id: str) -> Message:
        """The message the coordinator sends for ``message_type``."""
        if message_type == HELLO:
            content = RecordDict()
        elif message_type == SOURCE:
            content = RecordDict(
                {protocol.WEIGHTS_KEY: records.to_array_record(self.initial)}
            )
        else:
            settings: dict[str, ConfigValue] = {
                **protocol.AdaptRequest(
                    main="B", aux="C", weight_main=0.5, weight_aux=0.5
                ).to_fields(),
                **protocol.EvaluateRequest(predictors={"b": [("B", 1.0)]}).to_fields(),
            }
            content = build_candidates(self.candidates, settings)
        return build_message(content, message_type, message_id)

    def repair(self, policy_file: Path) -> None:
        """Undo any damage: a fresh copy of the site, the DP policy, good weights."""
        if self.site.exists():
            shutil.rmtree(self.site)
        copy_site(self.federation, self.site)
        policy_file.write_text(policy_text(DP_POLICY))
        self.policy = policy_file
        self.candidates = {"B": self.good_weights, "C": self.good_weights}
        self.initial = self.good_weights


@pytest.fixture(scope="module")
def good_weights(run_config: dict[str, ConfigValue]) -> Arrays:
    config: RunConfig = load_run_config(run_config)
    return build_initial_weights(config)


@pytest.fixture
def sandbox(federation: Path, tmp_path: Path, good_weights: Arrays) -> Sandbox:
    box = Sandbox(
        federation=federation,
        site=tmp_path / "sites" / SITE,
        state=tmp_path / "state",
        policy=None,
        candidates={},
        initial=good_weights,
        good_weights=good_weights,
    )
    box.repair(tmp_path / "node-policy.toml")
    return box


# -------------------------------------------------------------------------- cases

Damage = Callable[[Sandbox], str]  # breaks the sandbox; returns what must be named


@dataclasses.dataclass(frozen=True)
class BadInput:
    """One class of bad input, sent as one message type.

    Attributes:
        message_type: the message the damage is sent with.
        damage: breaks the sandbox; returns the file, folder or parameter the reason
            must name.
        problem: fragments the reason must hold (the problem, in plain words).
        reaches_handler: False when the node refuses before its handler runs (no
            site folder, no usable policy): then nothing at all is written.
    """

    message_type: str
    damage: Damage
    problem: tuple[str, ...]
    reaches_handler: bool = True


def in_site(name: str, message_type: str) -> object:
    """The site-folder class ``name`` of ``tests/unit/bad_input.py``, sent so."""
    bad: BadSite = BAD_SITES[name]
    problem = (
        ("PolicyError", *bad.problem) if name.startswith("policy") else bad.problem
    )

    def damage(box: Sandbox) -> str:
        if name.startswith("policy"):
            box.policy = None  # the node reads <site>/policy.toml
        return str(bad.damage(box.site))

    return pytest.param(
        BadInput(message_type, damage, problem, not bad.before_data),
        id=f"{name}-{message_type}",
    )


def node_policy(text: str | None) -> Damage:
    """Give the node a policy file holding ``text`` (None: name a missing file)."""

    def damage(box: Sandbox) -> str:
        assert box.policy is not None
        if text is None:
            box.policy = box.policy.with_name("no-such-policy.toml")
        else:
            box.policy.write_text(text)
        return str(box.policy)

    return damage


def break_model(how: str, *, initial: bool = False) -> Damage:
    """Drop, reshape or add a parameter of candidate B (or the initial weights)."""

    def damage(box: Sandbox) -> str:
        weights = dict(box.initial if initial else box.candidates["B"])
        named = sorted(weights)[0]
        if how == "drop":
            del weights[named]
        elif how == "reshape":
            weights[named] = np.zeros((3,), np.float32)
        else:
            named = "model.extra.weight"
            weights[named] = np.zeros((3,), np.float32)
        if initial:
            box.initial = weights
        else:
            box.candidates = {**box.candidates, "B": weights}
        return named

    return damage


def in_node(
    case_id: str,
    message_type: str,
    damage: Damage,
    *problem: str,
    reaches_handler: bool = True,
) -> object:
    return pytest.param(
        BadInput(message_type, damage, problem, reaches_handler), id=case_id
    )


# Every class of tests/unit/bad_input.py, sent as each action that reads it.
SITE_CASES: Final[list[tuple[str, str]]] = [
    # unreadable or truncated files, where each action reads them
    ("garbage-train-image", SOURCE),
    ("garbage-train-label", SOURCE),
    ("garbage-train-image", LFTM),
    ("garbage-train-image", ADAPT),
    ("garbage-test-image", EVALUATE),
    ("truncated-nii.gz", SOURCE),
    ("truncated-nii", SOURCE),
    ("truncated-mha", SOURCE),
    ("truncated-nii.gz", ADAPT),
    ("truncated-nii-test-label", EVALUATE),
    ("truncated-dicom-slice", LFTM),
    # image/label geometry
    ("geometry-size", SOURCE),
    ("geometry-spacing", SOURCE),
    ("geometry-origin", SOURCE),
    ("geometry-direction", SOURCE),
    ("geometry-size-test-label", EVALUATE),
    # label values
    ("label-outside-classes", SOURCE),
    ("label-outside-classes-test-label", EVALUATE),
    ("label-not-integer", SOURCE),
    # intensities
    ("nan-train-image", SOURCE),
    ("inf-train-image", LFTM),
    ("nan-train-image", ADAPT),
    ("inf-test-image", EVALUATE),
    # the site folder
    ("missing-site-folder", HELLO),
    ("missing-site-folder", SOURCE),
    ("empty-site-folder", HELLO),
    ("empty-site-folder", ADAPT),
    ("no-cases-in-imagesTr", HELLO),
    ("no-cases-in-imagesTr", SOURCE),
    # the site's own policy file
    ("policy-not-toml", HELLO),
    ("policy-unknown-key", SOURCE),
]
CASES: Final = [
    *(in_site(name, message_type) for name, message_type in SITE_CASES),
    # a policy file the node was started with
    in_node(
        "node-policy-bad-value-query.lftm",
        LFTM,
        node_policy(policy_text({"release.max-reply-mb": "lots"})),
        "PolicyError",
        "release.max-reply-mb must be a number, got 'lots'",
        reaches_handler=False,
    ),
    in_node(
        "node-policy-missing-file-evaluate",
        EVALUATE,
        node_policy(None),
        "PolicyError",
        "names no readable file",
        reaches_handler=False,
    ),
    # model parameters against the manifest
    in_node(
        "model-reshaped-initial-weights-train.source",
        SOURCE,
        break_model("reshape", initial=True),
        "initial weights",
        MANIFEST,
        "has shape (3,)",
    ),
    in_node(
        "model-missing-parameter-query.lftm",
        LFTM,
        break_model("drop"),
        "model 'B'",
        MANIFEST,
        "missing [",
    ),
    in_node(
        "model-extra-parameter-train.adapt",
        ADAPT,
        break_model("extra"),
        "model 'B'",
        MANIFEST,
        "unexpected [",
    ),
    in_node(
        "model-reshaped-evaluate",
        EVALUATE,
        break_model("reshape"),
        "model 'B'",
        MANIFEST,
        "has shape (3,)",
    ),
]


# -------------------------------------------------------------------------- tests


def files_under(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_is_named_nothing_is_half_written_and_the_site_serves_on(
    sandbox: Sandbox,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    bad: BadInput,
) -> None:
    # Prepare: a site that has answered once and has spent DP budget before
    seed = site_app(sandbox.request(protocol.HELLO, "m0"), sandbox.context(run_config))
    assert not seed.has_error(), reason_of(seed)
    write_accountant_state(SEED_HISTORY, sandbox.state / ACCOUNTANT_FILE)
    accountant_before = (sandbox.state / ACCOUNTANT_FILE).read_bytes()
    ledger_before = (sandbox.state / LEDGER_FILE).read_bytes()
    named = bad.damage(sandbox)
    # The file by its place in the site with the case as an index, as the damaged
    # site's names give it (the repair below renames files back).
    expected_name = redact_site_text(named, site_dir=sandbox.site)
    files_before = files_under(tmp_path)

    # Execute: the bad message, then the next one once the input is repaired
    reply = site_app(
        sandbox.request(bad.message_type, MESSAGE_ID), sandbox.context(run_config)
    )
    # The query book is charged before the work runs (and stays charged).
    files_after = [
        name for name in files_under(tmp_path) if not name.startswith("state/queries")
    ]
    accountant_after = (sandbox.state / ACCOUNTANT_FILE).read_bytes()
    ledger_after = (sandbox.state / LEDGER_FILE).read_bytes()
    sandbox.repair(tmp_path / "node-policy.toml")
    next_reply = site_app(
        sandbox.request(protocol.HELLO, "m2"), sandbox.context(run_config)
    )

    # Assert: the reply names the file (or parameter) and the problem, the file by
    # its place in the site with the case as an index: no path, no case name leaves.
    assert_site_error(reply, expected_name, *bad.problem)
    assert str(tmp_path) not in reason_of(reply)
    assert "b_000" not in reason_of(reply)
    assert "b_002" not in reason_of(reply)
    # Nothing half-written: no file appeared (no temporary, no partial model), the
    # accountant is byte for byte what it was, and the ledger only grew by the one
    # complete entry of the error reply (errors are ledgered like every reply).
    assert files_after == files_before
    assert accountant_after == accountant_before
    assert ledger_after.startswith(ledger_before)
    assert verify_ledger(sandbox.state / LEDGER_FILE).ok
    entries = Ledger(sandbox.state / LEDGER_FILE).entries()
    assert ledger_after.count(b"\n") == ledger_before.count(b"\n") + 1
    assert entries[1].message_type == bad.message_type
    assert entries[1].decision == "error"
    unanchored, anchor = protocol.LedgerAnchor.split_reason(reason_of(reply))
    assert anchor == protocol.LedgerAnchor(1, entries[1].entry_hash)
    assert entries[1].egress == measure_error(unanchored)
    assert entries[1].epsilon_spent == 0.0
    assert (entries[1].policy == {}) == (not bad.reaches_handler)
    # The node keeps serving: the next message gets a normal reply.
    assert not next_reply.has_error(), reason_of(next_reply)
    assert next_reply.metadata.reply_to_message_id == "m2"
    assert entries[-1].message_type == protocol.HELLO
    assert entries[-1].released


@pytest.mark.parametrize(
    "bad",
    [
        in_site("nan-train-image", SOURCE),
        in_site("garbage-train-image", LFTM),
        in_node("model-extra-parameter", ADAPT, break_model("extra")),
        in_site("label-outside-classes-test-label", EVALUATE),
    ],
)
def test_after_bad_input_the_repaired_site_answers_the_same_action(
    sandbox: Sandbox,
    run_config: dict[str, ConfigValue],
    tmp_path: Path,
    bad: BadInput,
) -> None:
    # Prepare
    write_accountant_state(SEED_HISTORY, sandbox.state / ACCOUNTANT_FILE)
    bad.damage(sandbox)
    failed = site_app(
        sandbox.request(bad.message_type, MESSAGE_ID), sandbox.context(run_config)
    )
    assert_site_error(failed)

    # Execute
    sandbox.repair(tmp_path / "node-policy.toml")
    reply = site_app(
        sandbox.request(bad.message_type, "m2"), sandbox.context(run_config)
    )

    # Assert: a normal reply, and DP-SGD spends from the history the error left
    assert not reply.has_error(), reason_of(reply)
    expected_records = {
        SOURCE: {protocol.WEIGHTS_KEY},
        LFTM: set(),
        ADAPT: {protocol.model_key("main"), protocol.model_key("aux")},
        EVALUATE: set(),
    }
    assert set(reply.content.array_records) == expected_records[bad.message_type]
    history = read_accountant_state(sandbox.state / ACCOUNTANT_FILE).history
    # Training on the site's data (source, adapt) and releasing statistics of its
    # labels (evaluate) are DP releases under the site's DP policy; LFTM is not.
    if bad.message_type in (SOURCE, ADAPT, EVALUATE):
        assert history[: len(SEED_HISTORY.history)] == SEED_HISTORY.history
        assert len(history) == len(SEED_HISTORY.history) + 1
    else:
        assert history == SEED_HISTORY.history
    assert verify_ledger(sandbox.state / LEDGER_FILE).ok


def test_every_class_of_bad_site_input_goes_through_the_app() -> None:
    # Assert: a new class in tests/unit/bad_input.py needs a case here too
    assert {name for name, _ in SITE_CASES} == set(BAD_SITES)
