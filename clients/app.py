"""The SiteBridge ClientApp: one small handler per action (DESIGN.md section 4).

Each handler parses the run config once, resolves its site, calls one ``core.jobs``
function and encodes only what the contract lets leave: weights, per-case scores
without case names, and aggregate metrics. A failure becomes an error reply whose
reason names the file and the problem; the node keeps serving.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from clients import records
from clients.site import SiteLocation, resolve_site
from core import protocol
from core.config import RunConfig, load_run_config
from core.data import SiteDataError, index_site
from core.jobs import (
    adapt_target,
    evaluate_predictors,
    score_candidates,
    train_source_model,
)

LOGGER = logging.getLogger("sitebridge.site")

app = ClientApp()

Handler = Callable[[Message, Context, RunConfig, SiteLocation], Message]


def site_handler(handler: Handler) -> Callable[[Message, Context], Message]:
    """Parse config and site once; turn a site failure into a naming error reply."""

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            config = load_run_config(context.run_config)
            site = resolve_site(context, config)
            return handler(message, context, config, site)
        except (SiteDataError, ValueError, FileNotFoundError, RuntimeError) as error:
            reason = f"{type(error).__name__}: {error}"
            LOGGER.error("%s failed: %s", message.metadata.message_type, reason)
            return Message(
                Error(code=protocol.SITE_ERROR_CODE, reason=reason), reply_to=message
            )

    return wrapped


def _progress(site: SiteLocation) -> Callable[[str], None]:
    def emit(line: str) -> None:
        print(f"[site {site.name}] {line}", flush=True)

    return emit


@app.query("hello")
@site_handler
def hello(
    message: Message, _context: Context, config: RunConfig, site: SiteLocation
) -> Message:
    """Describe the site: name, modality and case counts (never case names)."""
    index = index_site(site.directory)
    reply = protocol.HelloReply(
        site=site.name,
        modality=index.modality,
        labelled=len(index.labelled),
        unlabelled=len(index.unlabelled),
        evaluation=len(index.evaluation),
        class_names=index.class_names,
    )
    return records.build_reply(message, settings=reply.to_fields())


@app.train("source")
@site_handler
def train_source(
    message: Message, _context: Context, config: RunConfig, site: SiteLocation
) -> Message:
    """Train a source model on the site's labelled cases; reply with its weights."""
    initial = message.content.array_records.get(protocol.WEIGHTS_KEY)
    result = train_source_model(
        site.directory,
        config,
        initial_weights=None if initial is None else records.from_array_record(initial),
        progress=_progress(site),
    )
    reply = protocol.TrainReply(
        num_examples=result.num_examples,
        num_cases=result.num_cases,
        loss=result.final_loss,
        seconds=result.seconds,
    )
    return records.build_reply(
        message, metrics=reply.to_fields(), weights=result.weights
    )


@app.query("lftm")
@site_handler
def lftm(
    message: Message, _context: Context, config: RunConfig, site: SiteLocation
) -> Message:
    """Score every candidate model on this (target) site's images; reply ITM columns."""
    candidates = records.read_named_models(message.content)
    transferability = score_candidates(
        site.directory, candidates, config, progress=_progress(site)
    )
    columns = {
        name: [row[column] for row in transferability.itm]
        for column, name in enumerate(transferability.sources)
    }
    reply = protocol.LftmReply(
        metric=transferability.metric,
        sources=transferability.sources,
        itm_columns=columns,
    )
    settings, metrics = reply.to_fields()
    return records.build_reply(message, settings=settings, metrics=metrics)


@app.train("adapt")
@site_handler
def adapt(
    message: Message, _context: Context, config: RunConfig, site: SiteLocation
) -> Message:
    """Adapt the main/aux pair on this (target) site; reply the adapted weights."""
    request = protocol.AdaptRequest.from_fields(records.read_request(message.content))
    candidates = records.read_named_models(message.content)
    result = adapt_target(
        site.directory,
        candidates,
        config,
        main=request.main,
        aux=request.aux or None,
        weight_main=request.weight_main,
        weight_aux=request.weight_aux,
        progress=_progress(site),
    )
    models = {"main": result.main_weights}
    if result.aux_weights is not None:
        models["aux"] = result.aux_weights
    reply = protocol.AdaptReply(
        num_examples=result.num_examples,
        pseudo_label_foreground=result.pseudo_label_foreground,
        seconds=result.seconds,
    )
    return records.build_reply(message, metrics=reply.to_fields(), models=models)


@app.evaluate()
@site_handler
def evaluate(
    message: Message, _context: Context, config: RunConfig, site: SiteLocation
) -> Message:
    """Score the requested predictors on the evaluation labels (aggregates only)."""
    request = protocol.EvaluateRequest.from_fields(
        records.read_request(message.content)
    )
    models = records.read_named_models(message.content)
    scores = evaluate_predictors(
        site.directory, models, request.predictors, config, progress=_progress(site)
    )
    reply = protocol.EvaluateReply(
        num_cases=len(next(iter(scores.values())).cases) if scores else 0,
        dice={name: result.dice for name, result in scores.items()},
        hd95_mm={name: result.hd95_mm for name, result in scores.items()},
    )
    return records.build_reply(message, metrics=reply.to_fields())
