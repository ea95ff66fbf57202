"""The experiment ledger: the fleet-wide source of truth of an A/B experiment. Pure: no Ray, no I/O.

One instance lives in the `Ledger` Serve deployment (`serve.ledger_replica`, one replica), and
every ingress replica talks to it through a handle:
- every `experiment.flush_interval_s` an ingress replica hands over its `Tally` since the last
  flush and the rankings it showed (for feedback), and gets back the control state (arm weights,
  shadow, interleaving) with its version; so a weight change reaches every replica within one
  interval, without a redeploy;
- a read of the results is read-your-writes: it waits (bounded) until every live ingress replica
  has sent a batch sealed after the read began, so it counts every answer given before it;
- admin calls change the control state; each change is logged (who, when, what);
- after each flush the guardrails judge every candidate arm and a canary ramp may advance.

Why a Serve deployment holding the state (and not Redis or Prometheus): one writer makes every
merge exact (Prometheus histograms are fixed buckets and rates, not rankings' agreement), it
needs nothing beyond Ray (the local main job runs without Redis), and Serve restarts it if it
dies; it outlives ingress restarts and redeploys of the arms. Its state is lost only when the
ledger replica itself is lost, which the results say (`started_at`).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from engine.errors import InputError
from serve.cascade import cascade_precision
from serve.config import ArmConfig, CascadeConfig, FleetConfig
from serve.experiments import AGREEMENT_METRICS, ArmTally, Tally
from serve.router import ControlState, InterleavePolicy, NoiseFloorPolicy, ShadowPolicy
from serve.statistics import Moments, mean_difference_ci, quantile_ratio_ci, samples_needed, sign_test_p, wilson
from ranking.metrics import click_ndcg, reciprocal_rank

CHANGE_LOG = 500  # most recent control changes kept
GUARDRAIL_LEVEL = 0.99  # guardrails look repeatedly: a stricter interval than the 95 % reported
PAST_EXPERIMENTS = 5
READ_WAIT_FLUSHES = 4  # a read waits at most this many flush intervals for the ingress replicas' batches
SILENT_SOURCE_FLUSHES = 10  # an ingress replica not heard from for this many flush intervals is gone


class UnknownRequest(InputError):
    """Feedback names a request id the ledger does not know (never answered, or forgotten)."""


class AlreadyRecorded(InputError):
    """Feedback for this request was recorded before."""


class ExperimentStopped(InputError):
    """Feedback for an experiment that has stopped."""


class AdminForbidden(InputError):
    """An admin call without a valid admin key (or with none configured)."""


@dataclass(frozen=True)
class Shown:
    """A ranking a client was shown, kept for joining feedback: the documents' indices best first,
    and, for an interleaved answer, the team (arm) of each position."""

    request_id: str
    arms: tuple[str, ...]  # one arm, or the two interleaved arms
    ranking: tuple[int, ...]
    teams: tuple[int, ...] = ()  # interleaved: index into arms per position
    n_documents: int = 0


@dataclass(frozen=True)
class FlushReply:
    """The ledger's answer to a flush: the control state, and the number of the newest fleet-wide
    read (an ingress replica that sealed its batch before that read began flushes again at once)."""

    control: ControlState
    latest_read: int


@dataclass
class Source:
    """An ingress replica as the ledger hears it: when it last flushed, and the newest read that
    had begun when it sealed its latest batch."""

    heard_at: float
    sealed_after_read: int


@dataclass
class Control:
    """The ledger's own, changing settings; `version` grows with each change. Ingress replicas get
    `ExperimentLedger.control_state()`, a frozen `ControlState` made from it."""

    version: int
    base_weights: dict[str, float]
    shadow_arm: str | None
    shadow_fraction: float
    noise_floor_fraction: float
    interleave: tuple[str, str] | None
    interleave_fraction: float
    active: bool = True
    tripped: dict[str, str] = field(default_factory=dict)
    overridden: set[str] = field(default_factory=set)  # an operator put these back: guardrails leave them be
    ramp_step: int | None = None
    ramp_since: int = 0  # the ramped arm's request count when its current step began
    ramp_state: str = "off"  # off | ramping | holding | halted | overridden


class ExperimentLedger:
    def __init__(self, fleet: FleetConfig, *, now=time.time):
        self.fleet = fleet
        self.arms = fleet.arm_names  # the arms, then the cascades: each routed, judged and reported by name
        self.reference = fleet.reference_arm
        self._now = now
        self.epoch = now()  # a restarted ledger is a new epoch: ingress replicas follow it whatever its version
        self._seen_seq: dict[str, int] = {}  # ingress replica -> last batch merged
        self._sources: dict[str, Source] = {}  # the live ingress replicas, by `LedgerLink.source`
        self._reads = 0  # fleet-wide reads begun
        shadow, inter = fleet.router.shadow, fleet.router.interleave
        ramp = fleet.experiment.ramp
        self.control = Control(
            version=1, base_weights=fleet.weights,
            shadow_arm=shadow.arm if shadow else None, shadow_fraction=shadow.fraction if shadow else 0.0,
            noise_floor_fraction=fleet.experiment.noise_floor_fraction,
            interleave=tuple(inter.arms) if inter else None, interleave_fraction=inter.fraction if inter else 0.0,
            ramp_step=0 if ramp else None, ramp_state="ramping" if ramp else "off",
        )  # fmt: skip
        self.changes: deque[dict] = deque(maxlen=CHANGE_LOG)
        self.past: deque[dict] = deque(maxlen=PAST_EXPERIMENTS)
        self._start(fleet.experiment.name, "config")
        self._log("config", "experiment started", {"name": self.name})

    # ----------------------------------------------------------------- state

    def _start(self, name: str, who: str) -> None:
        self.name = name
        self.started_at = self._now()
        self.stopped_at: float | None = None
        self.tally = Tally(self.arms)
        self.shown: OrderedDict[str, Shown] = OrderedDict()
        self.feedback_seen: set[str] = set()  # ids in `shown` that have had their feedback
        self.feedback_count = 0
        self.interleave_credit: dict[str, list[int]] = {}  # "a|b" -> [a wins, b wins, ties]
        self._judged_at: dict[str, int] = {}  # arm -> evidence count at its last guardrail look
        # A tripped arm stays out across experiments: only an operator's weight puts it back.
        c = self.control
        c.active = True
        if self.fleet.experiment.ramp:
            c.ramp_step, c.ramp_since = 0, 0
            c.ramp_state = "halted" if self.fleet.experiment.ramp.arm in c.tripped else "ramping"

    def _log(self, who: str, what: str, detail: dict[str, Any]) -> None:
        self.control.version += 1
        self.changes.append({"at": self._now(), "who": who, "what": what, "detail": detail, "version": self.control.version})

    def weights(self) -> dict[str, float]:
        """Routed weights now: the base weights, the ramped arm at its step's share, tripped arms at 0."""
        c = self.control
        w = dict(c.base_weights)
        ramp = self.fleet.experiment.ramp
        if ramp and c.ramp_state in ("ramping", "holding") and c.ramp_step is not None:
            share = ramp.steps[c.ramp_step]
            others = {a: v for a, v in w.items() if a != ramp.arm}
            total = sum(others.values())
            w = {a: (1 - share) * v / total for a, v in others.items()} if total > 0 else dict.fromkeys(others, 0.0)
            w[ramp.arm] = share
        for arm in c.tripped:
            w[arm] = 0.0
        if sum(w.values()) <= 0:  # never leave nothing routable: the reference takes everything
            w[self.reference] = 1.0
        return w

    def control_state(self) -> ControlState:
        c = self.control
        weights = self.weights()
        # Interleaving shows both arms' documents to users: never an arm out of routed traffic.
        interleaves = c.active and c.interleave and all(weights[a] > 0 for a in c.interleave)
        return ControlState(
            epoch=self.epoch, version=c.version, experiment=self.name, active=c.active, weights=weights,
            shadow=ShadowPolicy(c.shadow_arm, c.shadow_fraction) if c.active and c.shadow_arm else None,
            noise_floor=NoiseFloorPolicy(self.reference, c.noise_floor_fraction if c.active else 0.0),
            interleave=InterleavePolicy(c.interleave, c.interleave_fraction) if interleaves else None,
        )  # fmt: skip

    # ----------------------------------------------------------------- from the ingress replicas

    def flush(self, source: str, seq: int, experiment: str, tally: dict | None, shown: list[Shown], sealed_after_read: int) -> FlushReply:
        """Batch `seq` of an ingress replica's records (`serve.ledger_link`), sealed when read
        `sealed_after_read` had begun. A batch merged before (its reply was lost) or recorded in
        another experiment is ignored; every batch, empty or not, is the replica's heartbeat."""
        heard = self._sources.setdefault(source, Source(0.0, 0))
        heard.heard_at = self._now()
        # A replica sends its batches in order, each once the one before was merged, so this
        # batch completes its records up to its sealing. max: a late copy of an older batch
        # (its call timed out and was sent again) must not take the read back.
        heard.sealed_after_read = max(heard.sealed_after_read, sealed_after_read)
        if seq > self._seen_seq.get(source, 0):
            self._seen_seq[source] = seq
            if self.control.active and experiment == self.name:
                if tally:
                    self.tally.merge(Tally.from_dict(tally))
                self._remember(shown)
                self._judge()
        return FlushReply(self.control_state(), self._reads)

    def _remember(self, shown: list[Shown]) -> None:
        for s in shown:
            self.shown[s.request_id] = s
            self.shown.move_to_end(s.request_id)
        while len(self.shown) > self.fleet.experiment.feedback_window:
            old, _ = self.shown.popitem(last=False)
            self.feedback_seen.discard(old)

    def feedback(self, request_id: str, clicked: list[int], purchased: list[int] | None = None) -> dict[str, Any]:
        """Join a client's clicks (and purchases) to the answer it was shown and credit the arm
        (or, interleaved, the team of each clicked position). Repeated feedback is refused."""
        if not self.control.active:
            raise ExperimentStopped("request_id", f"experiment {self.name!r} has stopped: feedback is no longer counted")
        s = self.shown.get(request_id)
        if s is None:
            raise UnknownRequest("request_id", f"no answered request {request_id!r} in the last {self.fleet.experiment.feedback_window} "
                                 "(feedback must name the id of a rerank response of the running experiment)")  # fmt: skip
        if request_id in self.feedback_seen:
            raise AlreadyRecorded("request_id", f"feedback for request {request_id!r} was already recorded")
        for name, indices in (("clicked", clicked), ("purchased", purchased or [])):
            for i, d in enumerate(indices):
                if not 0 <= d < s.n_documents:
                    raise InputError(f"{name}.{i}", f"document index {d} is not in the request's 0..{s.n_documents - 1}")
        self.feedback_seen.add(request_id)
        self.feedback_count += 1
        # A purchase counts as a click for credit (it implies one).
        relevant = set(clicked) | set(purchased or [])
        if s.teams:
            credit = dict.fromkeys(s.arms, 0)
            for pos, doc in enumerate(s.ranking):
                if doc in relevant:
                    credit[s.arms[s.teams[pos]]] += 1
            # Either arm may have picked first; the pair is counted in one order (the config's).
            a, b = self.control.interleave if set(self.control.interleave or ()) == set(s.arms) else sorted(s.arms)
            row = self.interleave_credit.setdefault(f"{a}|{b}", [0, 0, 0])
            row[0 if credit[a] > credit[b] else 1 if credit[b] > credit[a] else 2] += 1
            return {"request_id": request_id, "arms": list(s.arms), "credit": credit}
        t = self.tally.arms[s.arms[0]]
        t.clicks_ndcg.add(click_ndcg(s.ranking, relevant))
        t.clicks_rr.add(reciprocal_rank(s.ranking, relevant))
        return {"request_id": request_id, "arms": list(s.arms)}

    # ----------------------------------------------------------------- admin

    def set_weights(self, who: str, weights: dict[str, float]) -> ControlState:
        for arm, w in weights.items():
            if arm not in self.arms:
                raise InputError(f"weights.{arm}", f"unknown arm; arms are {self.arms}")
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise InputError(f"weights.{arm}", "must be a finite number >= 0")
        new = {**self.control.base_weights, **{a: float(w) for a, w in weights.items()}}
        if sum(new.values()) <= 0:
            raise InputError("weights", "at least one arm needs a weight > 0")
        before = self.weights()
        self.control.base_weights = new
        untripped = [a for a, w in weights.items() if w > 0 and self.control.tripped.pop(a, None)]
        self.control.overridden.update(untripped)  # the operator decided: the same evidence must not trip it again
        if self.control.ramp_state in ("ramping", "holding"):
            self.control.ramp_state = "overridden"  # an operator's weights win over the ramp
        self._log(who, "weights", {"before": before, "after": self.weights(), "untripped": untripped})
        return self.control_state()

    def set_shadow(self, who: str, arm: str | None, fraction: float | None, noise_floor_fraction: float | None,
                   interleave_fraction: float | None = None) -> ControlState:  # fmt: skip
        """Mirrored traffic (shadow arm and share, noise-floor share) and the interleaved share."""
        if arm is not None and arm not in self.arms:
            raise InputError("arm", f"unknown arm {arm!r}; arms are {self.arms}")
        c = self.control
        if interleave_fraction is not None and c.interleave is None:
            raise InputError("interleave_fraction", "no interleaved arms are configured (router.interleave)")

        def view() -> dict:
            return {"arm": c.shadow_arm, "fraction": c.shadow_fraction, "noise_floor_fraction": c.noise_floor_fraction,
                    "interleave_fraction": c.interleave_fraction}  # fmt: skip

        before = view()
        c.shadow_arm = arm
        if fraction is not None:
            c.shadow_fraction = fraction
        if noise_floor_fraction is not None:
            c.noise_floor_fraction = noise_floor_fraction
        if interleave_fraction is not None:
            c.interleave_fraction = interleave_fraction
        after = view()
        self._log(who, "shadow", {"before": before, "after": after})
        return self.control_state()

    def start(self, who: str, name: str) -> ControlState:
        self.past.appendleft(self.results())
        self._start(name, who)
        self._log(who, "experiment started", {"name": name})
        return self.control_state()

    def stop(self, who: str) -> ControlState:
        if self.control.active:
            self.control.active = False
            self.stopped_at = self._now()
            self._log(who, "experiment stopped", {"name": self.name})
        return self.control_state()

    # ----------------------------------------------------------------- guardrails and ramp

    def _judge(self) -> None:
        """Look at each candidate arm once per `min_requests` new pieces of evidence (answers,
        failures, comparisons), not at every flush: with 99 % intervals and few looks, an arm
        sitting at a limit is not tripped by chance alone."""
        g = self.fleet.experiment.guardrails
        for arm in self.arms:
            if arm == self.reference or arm in self.control.tripped or arm in self.control.overridden:
                continue
            t = self.tally.arms[arm]
            evidence = t.requests + t.server_errors + sum(ms.get("spearman", Moments()).n for ms in t.agreement.values())
            if evidence < self._judged_at.get(arm, 0) + g.min_requests:
                continue
            self._judged_at[arm] = evidence
            why = self._guardrail_breach(arm, g)
            if why:
                self.control.tripped[arm] = why
                if self.fleet.experiment.ramp and self.fleet.experiment.ramp.arm == arm:
                    self.control.ramp_state = "halted"
                self._log("guardrail", "arm out of routed traffic", {"arm": arm, "why": why})
        self._advance_ramp()

    def _guardrail_breach(self, arm: str, g) -> str | None:
        t = self.tally.arms[arm]
        if g.min_agreement is not None:
            m = t.agreement.get(self.reference, {}).get(g.agreement_metric)
            if m is not None and m.n >= g.min_requests and (ci := m.ci(GUARDRAIL_LEVEL)) and ci[1] < g.min_agreement:
                return f"{g.agreement_metric} agreement with {self.reference} {m.mean:.4f} (99 % CI {ci[0]:.4f}..{ci[1]:.4f}) is below {g.min_agreement} over {m.n} comparisons"
        answered = t.requests + t.server_errors
        if g.max_error_rate is not None and answered >= g.min_requests:
            lo, _ = wilson(t.server_errors, answered, GUARDRAIL_LEVEL)
            if lo > g.max_error_rate:
                return f"error rate {t.server_errors}/{answered} (99 % CI from {lo:.3f}) is over {g.max_error_rate}"
        if g.p95_slo_ms is not None and t.latency.n >= g.min_requests:
            slow, n = t.latency.share_over(g.p95_slo_ms / 1000)
            lo, _ = wilson(slow, n, GUARDRAIL_LEVEL)
            if lo > 0.05:
                return f"{slow}/{n} requests over the {g.p95_slo_ms:g} ms SLO (99 % CI from {lo:.3f}, more than 5 %): p95 over the SLO"
        return None

    def _advance_ramp(self) -> None:
        ramp, c = self.fleet.experiment.ramp, self.control
        if not ramp or c.ramp_state != "ramping" or c.ramp_step is None:
            return
        answered = self.tally.arms[ramp.arm].requests
        if answered - c.ramp_since < ramp.min_requests:
            return
        if c.ramp_step + 1 < len(ramp.steps):
            c.ramp_step += 1
            c.ramp_since = answered
            self._log("ramp", "ramp advanced", {"arm": ramp.arm, "share": ramp.steps[c.ramp_step], "after_requests": answered})
        else:
            c.ramp_state = "holding"
            self._log("ramp", "ramp complete", {"arm": ramp.arm, "share": ramp.steps[c.ramp_step]})

    # ----------------------------------------------------------------- results

    def begin_read(self) -> int:
        """A fleet-wide read begins: its number, which every flush reply carries from now on."""
        self._reads += 1
        return self._reads

    def unreported(self, read: int) -> list[str]:
        """The live ingress replicas that have not yet sent a batch sealed after `read` began (their
        answers given before it may be missing). One silent for SILENT_SOURCE_FLUSHES flush
        intervals is forgotten: a dead replica must not hold up reads."""
        silent_since = self._now() - SILENT_SOURCE_FLUSHES * self.fleet.experiment.flush_interval_s
        self._sources = {s: h for s, h in self._sources.items() if h.heard_at >= silent_since}
        return sorted(s for s, h in self._sources.items() if h.sealed_after_read < read)

    def results(self, unreported: list[str] | None = None) -> dict[str, Any]:
        """The experiment's numbers; `unreported`: the ingress replicas a read gave up waiting for."""
        exp = self.fleet.experiment
        now = self.stopped_at or self._now()
        elapsed = max(1e-9, now - self.started_at)
        floor = self.tally.arms[self.reference].agreement.get(self.reference, {})
        ref = self.tally.arms[self.reference]
        weights = self.weights()
        arms = {}
        for name in self.arms:
            t = self.tally.arms[name]
            cascade = self.fleet.cascade(name)
            if cascade is None:
                cfg = self.fleet.arm(name)
                kind = {"precision": cfg.precision, "backend": cfg.backend}
                cost = _cost(_hourly(cfg), t.requests, elapsed, _replicas(cfg))
            else:
                kind = {"precision": cascade_precision(self.fleet, cascade), "backend": None}
                cost = self._cascade_cost(cascade, t, elapsed)
            arms[name] = {
                **kind, "weight": weights[name],
                **_arm_summary(name, t),
                "cost_per_1000_requests": cost,
                "agreement_with_reference": _agreement(t.agreement.get(self.reference, {})) if name != self.reference else None,
                "noise_floor": _agreement(floor) if name == self.reference else None,
                "clicks": _clicks(t),
            }  # fmt: skip
            if cascade is not None:
                arms[name]["cascade"] = self._cascade_view(cascade, t)
            if name != self.reference:
                arms[name]["versus_reference"] = self._versus(name, t, ref, floor, exp)
        return {
            "experiment": self.name, "active": self.control.active, "reference": self.reference,
            "started_at": self.started_at, "stopped_at": self.stopped_at, "elapsed_s": round(elapsed, 3),
            "scope": "fleet: every ingress replica, merged in the ledger",
            "unreported_sources": unreported or [],  # their answers since their last flush are missing
            "control": {**self.control_state().to_json(), "base_weights": self.control.base_weights, "tripped": self.control.tripped,
                        "ramp": self._ramp_view()},  # fmt: skip
            "arms": arms,
            "feedback": {"received": self.feedback_count, "joinable_requests": len(self.shown)},
            "interleaving": {pair: _interleave_view(pair, row) for pair, row in self.interleave_credit.items()},
            "changes": list(self.changes)[-50:],
        }

    def _cascade_view(self, c: CascadeConfig, t: ArmTally) -> dict[str, Any]:
        """A cascade's own figures: the pairs each of its arms scored for it, and its agreement with
        its then arm alone, from mirrored calls: the cascade mirrored on the then arm's traffic (the
        then arm's ranking the reference) where there are any, else the then arm mirrored on the
        cascade's (`router.shadow.arm` the then arm: the cascade's ranking the reference)."""
        mirrored_on_then = t.agreement.get(c.then, {})
        if mirrored_on_then:
            agreement, source = mirrored_on_then, f"the cascade mirrored on {c.then!r}'s requests"
        else:
            agreement, source = self.tally.arms[c.then].agreement.get(c.name, {}), f"{c.then!r} mirrored on the cascade's requests"
        return {
            "first": c.first, "then": c.then, "k": c.k, "pairs_scored": {arm: t.stage_pairs.get(arm, 0) for arm in (c.first, c.then)},
            "then_pairs_per_request": round(t.stage_pairs.get(c.then, 0) / t.requests, 3) if t.requests else None,
            "degraded_answers": t.cascade_degraded,
            "agreement_with_then": {**_agreement(agreement), "source": source if agreement else None},
        }  # fmt: skip

    def _cascade_cost(self, c: CascadeConfig, t: ArmTally, elapsed_s: float) -> dict[str, Any] | None:
        """Cost per 1000 of the cascade's requests: each of its two arms' cost over the experiment,
        in proportion to the share of that arm's scored pairs it scored for the cascade."""
        hourly = {arm: _hourly(self.fleet.arm(arm)) for arm in (c.first, c.then)}
        if None in hourly.values() or t.requests == 0:
            return None
        spent = {}
        for arm, per_hour in hourly.items():
            scored = self.tally.arms[arm].pairs_scored
            spent[arm] = per_hour * elapsed_s / 3600 * (t.stage_pairs.get(arm, 0) / scored if scored else 0.0)
        return {
            "value": round(1000 * sum(spent.values()) / t.requests, 6), "by_arm": {a: round(1000 * v / t.requests, 6) for a, v in spent.items()},
            "basis": "each of its arms' replicas over the experiment, in proportion to the pairs it scored for this cascade "
                     "(its share of that arm's scored pairs), at the load they carried (idle time included)",
        }  # fmt: skip

    def _ramp_view(self) -> dict | None:
        ramp, c = self.fleet.experiment.ramp, self.control
        if not ramp:
            return None
        return {"arm": ramp.arm, "state": c.ramp_state, "step": c.ramp_step, "share": ramp.steps[c.ramp_step or 0], "steps": ramp.steps}

    def _versus(self, arm: str, t: ArmTally, ref: ArmTally, floor: dict[str, Moments], exp) -> dict[str, Any]:
        """The arm against the reference: latency ratios, agreement against the noise floor, a verdict."""
        metric = exp.guardrails.agreement_metric
        latency = {}
        for q in (0.5, 0.95):
            a, r = t.latency.quantile(q), ref.latency.quantile(q)
            ci = quantile_ratio_ci(t.latency, ref.latency, q)
            latency[f"p{int(q * 100)}_ratio"] = {"value": round(a / r, 4) if a and r else None, "ci95": _round(ci)}
        mine = t.agreement.get(self.reference, {}).get(metric, Moments())
        base = floor.get(metric)
        need = max(2, exp.guardrails.min_requests)
        if base is None or base.n < 2:
            base = Moments(2, 2.0, 2.0)  # no floor measured: judge against perfect agreement (1.0)
            floor_note = "no noise floor measured (experiment.noise_floor_fraction is 0 or no data yet): judged against 1.0"
        else:
            floor_note = f"noise floor {metric} {base.mean:.4f} over {base.n} self-comparisons"
        gap = mean_difference_ci(base, mine)  # floor - arm: how much worse than the reference ranks like itself
        if mine.n < need:
            ranking, more = "not enough data", need - mine.n
        elif gap is not None and gap[1] <= exp.equivalence_margin:
            ranking, more = "equivalent within the noise floor", 0
        elif gap is not None and gap[0] > exp.equivalence_margin:
            ranking, more = "ranks worse than the reference", 0
        else:
            n = samples_needed(base, mine, exp.equivalence_margin)
            ranking, more = "not enough data", (None if n is None else max(0, n - mine.n))
            if n is None:
                floor_note += " (the floor's own uncertainty decides: raise experiment.noise_floor_fraction)"
        p95 = latency["p95_ratio"]["ci95"]
        if p95 is None:
            speed = "not enough data"
        elif p95[0] > 1 + exp.latency_margin:
            speed = "slower at p95"
        elif p95[1] < 1 - exp.latency_margin:
            speed = "faster at p95"
        else:
            speed = f"p95 within {exp.latency_margin:.0%} or undecided"
        tripped = self.control.tripped.get(arm)
        verdict = "guardrail tripped: out of routed traffic" if tripped else ranking
        return {
            "latency": latency,
            "agreement": {"metric": metric, "arm": _moments(mine), "floor_minus_arm_ci95": _round(gap), "margin": exp.equivalence_margin},
            "ranking": ranking, "speed": speed, "verdict": verdict, "more_requests_needed": more,
            "evidence": f"{metric} agreement {_fmt(mine.mean)} over {mine.n} comparisons vs {floor_note}; "
                        f"difference CI {_round(gap)} against margin {exp.equivalence_margin}; p95 ratio CI {p95}" + (f"; {tripped}" if tripped else ""),
        }  # fmt: skip


def _arm_summary(arm: str, t: ArmTally) -> dict[str, Any]:
    looked_up = t.cache_hits + t.cache_misses
    pairs = t.score_cache_hits + t.score_cache_misses
    answered = t.requests + t.server_errors
    return {
        "requests": t.requests,
        "errors": {"client": t.client_errors, "server": t.server_errors, "refused_503": t.refused,
                   "server_rate": round(t.server_errors / answered, 5) if answered else None, "server_rate_ci95": _round(wilson(t.server_errors, answered))},  # fmt: skip
        "routed_by": dict(t.routed_by),
        "latency_ms": {"n": t.latency.n, **{f"p{q}": _ms(t.latency.quantile(q / 100)) for q in (50, 95, 99)}},
        "mean_batch_requests": round(t.batch_requests_sum / t.requests, 3) if t.requests else None,
        "pairs_scored": t.pairs_scored,  # by this arm's engine: its answers', cascades' stages', mirrored calls' (not a cascade's: its arms')
        "image_cache": {"hits": t.cache_hits, "misses": t.cache_misses, "hit_rate": round(t.cache_hits / looked_up, 4) if looked_up else None,
                        "events": dict(t.cache_events)},  # fmt: skip
        "score_cache": {"hits": t.score_cache_hits, "misses": t.score_cache_misses,
                        "hit_rate": round(t.score_cache_hits / pairs, 4) if pairs else None,
                        "requests_without_arm_call": t.score_cache_whole},  # fmt: skip
        "shadow": {"requests": t.shadow_requests, "errors": t.shadow_errors, "dropped": t.shadow_dropped, "agreement": _pooled(t, arm)},
    }


def _pooled(t: ArmTally, arm: str) -> dict[str, Any]:
    """Mean agreement of this arm's shadow rankings with every other primary arm's, pooled, and
    how many comparisons each primary gave (self-comparisons, the noise floor, are left out)."""
    pooled: dict[str, Moments] = {}
    for primary, metrics in t.agreement.items():
        if primary != arm:
            for k, m in metrics.items():
                pooled.setdefault(k, Moments()).merge(m)
    n = pooled["spearman"].n if "spearman" in pooled else 0
    against = {p: ms["spearman"].n for p, ms in t.agreement.items() if p != arm and "spearman" in ms}
    return {"n": n, "against": against, **{k: _r(pooled[k].mean) for k in AGREEMENT_METRICS if k in pooled}}


def _agreement(metrics: dict[str, Moments]) -> dict[str, Any]:
    return {k: _moments(metrics[k]) for k in AGREEMENT_METRICS if k in metrics}


def _clicks(t: ArmTally) -> dict[str, Any]:
    return {"feedback": t.clicks_ndcg.n, "click_ndcg@10": _moments(t.clicks_ndcg), "mrr": _moments(t.clicks_rr)}


def _interleave_view(pair: str, row: list[int]) -> dict[str, Any]:
    a, b = pair.split("|")
    decided = row[0] + row[1]
    return {
        "wins": {a: row[0], b: row[1]}, "ties": row[2],
        "preference": round((row[0] - row[1]) / decided, 4) if decided else None,  # > 0: a preferred
        "sign_test_p": _r(sign_test_p(row[0], row[1])),
    }  # fmt: skip


def _hourly(cfg: ArmConfig) -> float | None:
    """What an arm's replicas cost per hour (None: no cost_per_replica_hour)."""
    if cfg.cost_per_replica_hour is None:
        return None
    return _replicas(cfg) * cfg.cost_per_replica_hour


def _replicas(cfg: ArmConfig) -> int:
    return cfg.autoscaling.min_replicas if cfg.autoscaling else cfg.num_replicas


def _cost(hourly: float | None, requests: int, elapsed_s: float, replicas: int) -> dict[str, Any] | None:
    if hourly is None or requests == 0:
        return None
    per_second = requests / elapsed_s
    return {
        "value": round(1000 * hourly / 3600 / per_second, 6), "replicas": replicas,
        "basis": "at the load this arm carried in the experiment (idle time included); at full load it costs less",
    }  # fmt: skip


def _moments(m: Moments) -> dict[str, Any]:
    return {"n": m.n, "mean": _r(m.mean), "ci95": _round(m.ci())}


def _ms(s: float | None) -> float | None:
    return None if s is None else round(1000 * s, 3)


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def _round(ci) -> list[float] | None:
    return None if ci is None else [round(float(ci[0]), 6), round(float(ci[1]), 6)]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"
