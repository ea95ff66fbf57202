"""The ingress's experiment routes: results (JSON and a page), feedback, and the admin changes
(weights, shadow, start, stop; admin keys only, checked by the guard). Thin: the work is the
replica's `ExperimentTraffic`'s and the `Ledger`'s."""

from fastapi import Body, Request
from fastapi.responses import HTMLResponse

from serve.experiment_page import render as render_experiment
from serve.http_app import ADMIN_ERRORS, ERRORS, app, documented, this_ingress
from serve.protocol import ExperimentStart, FeedbackRequest, FeedbackResponse, ShadowChange, WeightsChange


@app.get("/v1/experiments")
async def experiments(ingress=this_ingress) -> dict:
    """The running experiment, fleet-wide (every ingress replica's records, merged in the
    ledger; every answer given before the read counts, whichever replica gave it, unless
    `unreported_sources` names replicas that did not report in time): per arm requests, errors,
    latency, cache use and agreement, each candidate against the reference arm with 95 %
    intervals and a verdict, the noise floor, click feedback, interleaving credit, the control
    state and its change log. `this_replica` holds what only this ingress replica knows (its
    source id in the ledger, arm health, URL memo)."""
    return {
        **await ingress.experiment.results(),
        "router": {"sticky_header": ingress.fleet.router.sticky_header, "pin_header": ingress.fleet.router.pin_header},
        "this_replica": {"source": ingress.experiment.link.source, "url_memo_cache": ingress.fetcher.memo.snapshot(), "health": ingress.calls.health.snapshot()},
    }


@app.get("/v1/experiments/page", response_class=HTMLResponse)
async def experiment_page(ingress=this_ingress) -> HTMLResponse:
    """The running experiment as a readable page: each arm against the reference with its
    intervals and verdict, the control state, interleaving credit and the change log."""
    return HTMLResponse(render_experiment(await ingress.experiment.results()))


@app.post("/v1/experiments/weights", responses=ADMIN_ERRORS)
async def set_weights(change: WeightsChange, request: Request, ingress=this_ingress) -> dict:
    """Admin: change arm weights at runtime (every ingress within one flush interval; sticky
    users move only as far as the change requires). Returns the new control state."""
    return await ingress.experiment.admin(ingress.ledger.set_weights.remote(request.state.admin, change.weights))


@app.post("/v1/experiments/shadow", responses=ADMIN_ERRORS)
async def set_shadow(change: ShadowChange, request: Request, ingress=this_ingress) -> dict:
    """Admin: change the shadow arm and fraction, the noise-floor fraction or the interleaved fraction, at runtime."""
    return await ingress.experiment.admin(ingress.ledger.set_shadow.remote(
        request.state.admin, change.arm, change.fraction, change.noise_floor_fraction, change.interleave_fraction))  # fmt: skip


@app.post("/v1/experiments/start", responses=ADMIN_ERRORS)
async def start_experiment(change: ExperimentStart, request: Request, ingress=this_ingress) -> dict:
    """Admin: archive the running experiment's results and start a new one (counts from zero)."""
    return await ingress.experiment.admin(ingress.ledger.start.remote(request.state.admin, change.name))


@app.post("/v1/experiments/stop", responses=ADMIN_ERRORS)
async def stop_experiment(request: Request, ingress=this_ingress) -> dict:
    """Admin: stop the experiment: no more shadowing, interleaving, guardrails or counting;
    routing keeps the current weights."""
    return await ingress.experiment.admin(ingress.ledger.stop.remote(request.state.admin))


@app.post("/v1/feedback", response_model=FeedbackResponse, responses={**ERRORS, **documented(404, 409)})
async def feedback(body: FeedbackRequest = Body(...), ingress=this_ingress) -> FeedbackResponse:
    """What the user did with a ranking: the documents clicked (and purchased), joined to the
    arm that answered (per-arm click NDCG and MRR) or, for an interleaved answer, credited to
    each arm's team. 404 for an unknown or forgotten request id, 409 when already given."""
    return FeedbackResponse(**await ingress.experiment.feedback(body.request_id, body.clicked, body.purchased))
