"""The one loop that runs any schedule on this worker's stages.

A training step, forward-only inference, evaluation and calibration are all schedules
(``schedules.forward_only`` and ``schedules.sequential`` derive the last two kinds from the
pipeline's own), and this loop interprets every one of them the same way: for each action of
this worker, post the receives it and the next few need, compute, send. What differs between
them is passed in as a :class:`Run`, never stored on the pipeline and swapped back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from layerwise.runtime import skip_flow
from layerwise.runtime.builder import Built
from layerwise.runtime.shapes import PlanHistory
from layerwise.runtime.stage import output_grad_flags
from layerwise.runtime.step import StageError, Step, describe_failure, free_sent, split_batch
from layerwise.runtime.transport import LOSS_TAG, PLAN_TAG
from layerwise.runtime.tree import TensorMeta, flatten, signature, unflatten
from layerwise.schedules import Action, Schedule, dependency_keys
from layerwise.timeline import Event, Timeline

RECOMPUTE_MODES = ("never", "always", "except_last")
LOSS_REDUCTIONS = ("rows", "tokens")
IGNORE_INDEX = -100  # target value that ``tokens`` does not count (the usual ignore_index)
LOOKAHEAD = 2  # receives posted this many actions ahead of need
LossFn = Callable[[Any, Any], torch.Tensor]
LossReduction = str | Callable[[Any], float]


def micro_batch_weight(reduction: LossReduction, target: Any) -> float:
    """Return how much a micro-batch's mean loss counts in the step's, from its targets:
    ``rows``: its number of samples; ``tokens``: its target elements other than -100;
    a function: what it returns for the targets."""
    if callable(reduction):
        return float(reduction(target))
    first = flatten(target)[0][0]
    if reduction == "rows":
        return float(first.shape[0])
    if reduction == "tokens":
        return float((first != IGNORE_INDEX).sum())
    raise ValueError(
        f"loss_reduction must be one of {LOSS_REDUCTIONS} or a function of a micro-batch's "
        f"targets returning its weight, got {reduction!r}"
    )


def _zero_loss(out: Any) -> torch.Tensor:
    """A loss of 0 connected to ``out`` (its gradients are zeros): a micro-batch that counts
    for nothing, whose own mean loss may be 0/0."""
    floats = [t for t in flatten(out)[0] if t.is_floating_point()]
    return sum((t.sum() * 0.0 for t in floats), torch.zeros(()))


@dataclass(frozen=True)
class Run:
    """What one pass of the loop does: which schedule, and how.

    A schedule with backward actions trains (gradients accumulate, the loss comes back on
    every worker); a forward-only one returns the last stage's outputs on its worker."""

    schedule: Schedule
    loss_fn: LossFn | None = None
    recompute: str = "never"  # never | always | except_last: forwards recomputed in backward
    grad_reducer: Any = None  # stage_done(stage) after a stage's last backward; finish()
    loss_reduction: LossReduction = "rows"  # how micro-batch losses weigh (micro_batch_weight)

    @property
    def trains(self) -> bool:
        return any(a.kind != "F" for acts in self.schedule.actions for a in acts)

    def recomputes(self, mb: int) -> bool:
        """Whether micro-batch ``mb``'s forwards run without a graph, to be recomputed."""
        last = self.schedule.num_microbatches - 1
        return self.recompute == "always" or (self.recompute == "except_last" and mb < last)

    def message_key(self, signature: Any, mb: int) -> tuple[Any, str]:
        """What an activation's metadata is cached under: the micro-batch's shapes, and how
        the sender knows which outputs need a gradient (none, its graph, or recomputed)."""
        mode = "none" if not self.trains else "recomputed" if self.recomputes(mb) else "graph"
        return signature, mode


class Executor:
    """Runs schedules over one worker's :class:`Built` pipeline; keeps the last run's events."""

    def __init__(self, built: Built) -> None:
        self.built = built
        self.transport = built.transport
        self.transport.on_wait = self._record_wait
        self.events: list[Event] = []
        self.last_schedule: Schedule = built.schedule
        self.plans = PlanHistory()  # the micro-batches' shapes of the last few runs
        self.closed = False

    # -- who holds what -----------------------------------------------------------------------

    def holds_first(self, schedule: Schedule) -> bool:
        return schedule.stage_worker[0] == self.built.worker

    def holds_last(self, schedule: Schedule) -> bool:
        return schedule.stage_worker[-1] == self.built.worker

    # -- one run ------------------------------------------------------------------------------

    def run(self, run: Run, inputs: Any = None, targets: Any = None) -> Any:
        """Walk this worker's action list once. Training: return the batch's mean loss on
        every worker. Forward only: return the concatenated output on the last stage's
        worker, None elsewhere."""
        try:
            return self._run(run, inputs, targets)
        except StageError as err:
            self.transport.report_failure(str(err))
            raise

    def _run(self, run: Run, inputs: Any, targets: Any) -> Any:
        sched, stages = run.schedule, self.built.stages
        st = self._start(run, inputs, targets)
        acts = sched.actions[self.built.worker]
        # where each stage's gradients become final: its last B or W of the step
        grads_final = {a.stage: pos for pos, a in enumerate(acts) if a.kind in ("B", "W")}
        for pos, a in enumerate(acts):
            # post receives for this action and the next few, so data flows while we compute
            for k, ahead in enumerate(acts[pos : pos + 1 + LOOKAHEAD]):
                if not self._post(run, ahead, st, now=k == 0):
                    break  # later receives wait, so each stream is posted in order
            if a.kind == "F":
                self._forward(run, a, st)
            elif a.kind in ("B", "I"):
                self._backward(run, a, st)
            else:
                t0 = time.perf_counter()
                stages[a.stage].weight_grad_step(a.microbatch)
                self._event(t0, a)
            if run.grad_reducer is not None and grads_final.get(a.stage) == pos:
                run.grad_reducer.stage_done(stages[a.stage])
            self.transport.reap_sends()
        self.transport.reap_sends(block=True)
        self.transport.end_step()
        if not run.trains:
            return self._outputs(st) if self.holds_last(sched) else None
        if run.grad_reducer is not None:
            run.grad_reducer.finish()
        for tie in self.built.ties:
            tie.sum_grads(self.built.group)
        total = (
            float(sum(v.double() for v in st.losses.values())) if self.holds_last(sched) else 0.0
        )
        return self.from_last(sched, total, LOSS_TAG, "the loss")

    def _start(self, run: Run, inputs: Any, targets: Any) -> Step:
        """Agree on the micro-batches' shapes and cut this worker's share of the batch."""
        sched, worker = run.schedule, self.built.worker
        m = sched.num_microbatches
        if self.closed:
            raise RuntimeError("this pipeline is closed; build a new one to run more steps")
        if run.trains and run.loss_fn is None:
            raise ValueError("a training step needs a loss_fn")
        if run.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {run.recompute!r}")
        micro_batches: list[Any] = [None] * m
        if self.holds_first(sched):
            if inputs is None:
                raise ValueError(f"worker {worker} holds the first stage and needs the inputs")
            micro_batches = split_batch(inputs, m)
        plan = self._share_plan(sched, micro_batches)
        st = Step(plan=plan, rows=[r for r, _ in plan], inputs=micro_batches)
        if run.trains and self.holds_last(sched):
            if targets is None:
                raise ValueError(f"worker {worker} holds the last stage and needs the targets")
            st.targets = split_batch(targets, m)
            got = [flatten(t)[0][0].shape[0] for t in st.targets]
            if got != st.rows:
                raise ValueError(
                    f"targets split into micro-batches of {got} rows, inputs into {st.rows}"
                )
            st.weights = [micro_batch_weight(run.loss_reduction, t) for t in st.targets]
            share = getattr(run.grad_reducer, "replica_share", None)
            if run.trains and run.loss_reduction != "rows" and share is not None:
                st.share = share(sum(st.weights))  # replicas count by weight, not equally
        self.events = []
        self.last_schedule = sched
        return st

    def _share_plan(self, sched: Schedule, micro_batches: list[Any]) -> list[Any]:
        """Tell every worker the shape signature of each micro-batch (first worker knows).

        The first worker sends one number (point to point: it does not wait for the others
        to receive it): which of the last few steps had these shapes, or that none did, and
        then it broadcasts the pickled plan (:mod:`layerwise.runtime.shapes`)."""
        plan: list[Any] | None = None
        if self.holds_first(sched):
            plan = [(flatten(mb)[0][0].shape[0], signature(mb)) for mb in micro_batches]
        if sched.num_workers > 1:
            first = sched.stage_worker[0]
            code = self.plans.code(plan) if plan is not None else 0
            code = int(self.transport.share_number(code, first, PLAN_TAG, "the step's shapes"))
            if code == -1:
                box = [plan]
                dist.broadcast_object_list(
                    box, src=self.built.global_rank(first), group=self.built.group
                )
                plan = box[0]
            else:
                plan = self.plans.lookup(code)
        assert plan is not None
        if self.plans.use(plan):  # on every worker at once: both ends forget alike
            self.transport.forget_shapes(self.plans.signatures())
        return plan

    def from_last(self, sched: Schedule, number: float, tag: int, what: str) -> float:
        """Return the number of the last stage's worker on every worker."""
        if sched.num_workers == 1:
            return number
        return self.transport.share_number(number, sched.stage_worker[-1], tag, what)

    def _outputs(self, st: Step) -> Any:
        parts = [st.outputs[i] for i in range(len(st.rows))]
        first = flatten(parts[0])
        cat = [torch.cat([flatten(p)[0][k] for p in parts]) for k in range(len(first[0]))]
        return unflatten(cat, first[1])

    # -- actions ------------------------------------------------------------------------------

    def _head(
        self, run: Run, stage: int, mb: int, st: Step
    ) -> Callable[[Any], torch.Tensor] | None:
        """The last stage's loss for micro-batch ``mb``, weighted by its share of the step
        (``run.loss_reduction``); a batch that counts nothing gives 0."""
        if stage != run.schedule.num_stages - 1 or not run.trains:
            return None
        assert run.loss_fn is not None
        loss_fn, target, total = run.loss_fn, st.targets[mb], sum(st.weights)
        weight = st.weights[mb] / total * st.share if total else 0.0
        if weight == 0.0:
            return _zero_loss
        return lambda out: loss_fn(out, target) * weight

    def _post(self, run: Run, a: Action, st: Step, now: bool) -> bool:
        """Post the receive that action ``a`` will need from another worker, if any.

        Return False if that receive cannot be posted yet (so none after it may be)."""
        sched, worker = run.schedule, self.built.worker
        # a backward whose forward has not sent yet (or sent to this same worker) has nothing
        # to post now; a later one of its stream cannot have sent either, so order holds
        if a in st.posted or not (a.kind == "F" or (a.stage, a.microbatch) in st.sent):
            return True
        # the neighbouring stage's message only (skips are received when needed)
        near = a.stage - 1 if a.kind == "F" else a.stage + 1
        remote = [
            sched.stage_worker[stage]
            for stage, _, _ in dependency_keys(a, sched)
            if stage == near and sched.stage_worker[stage] != worker
        ]
        if not remote:
            return True
        peer = remote[0]
        if a.kind == "F":
            shapes = run.message_key(st.plan[a.microbatch][1], a.microbatch)
            if not now and not self.transport.knows(a.stage - 1, shapes):
                return False  # new shapes: metadata must be received in order, not ahead
            st.posted[a] = self.transport.post_activation(a.stage - 1, a.microbatch, peer, shapes)
        elif a.kind in ("B", "I"):
            like = st.sent[(a.stage, a.microbatch)]
            st.posted[a] = self.transport.post_gradient(like, a.stage + 1, a.microbatch, peer)
        return True

    def _forward(self, run: Run, a: Action, st: Step) -> None:
        sched, s, mb = run.schedule, a.stage, a.microbatch
        stage = self.built.stages[s]
        needs: list[bool] | None = None  # which inputs send a gradient back (the sender says)
        if s == 0:
            x = st.inputs[mb]
        elif a in st.posted:
            pending = st.posted.pop(a)
            x, needs = self.transport.complete(pending), pending.needs_grad
        else:
            x, needs = st.local.pop((s - 1, "F", mb))
        key = run.message_key(st.plan[mb][1], mb)
        if stage.pops_from:
            x, needs = skip_flow.gather(self.built, sched, s, mb, x, needs, key, st)
        recompute = run.recomputes(mb)
        t0 = time.perf_counter()
        loss = None
        try:
            if run.trains:
                out, loss = stage.forward_step(mb, x, self._head(run, s, mb, st), recompute,
                                               capture=sched.splits_backward(s),
                                               needs_grad=needs)  # fmt: skip
            else:
                with torch.no_grad():
                    out = stage.run(x)
        except (RuntimeError, ValueError, TypeError) as err:
            raise StageError(describe_failure(stage, mb, x, s, err)) from err
        t1 = time.perf_counter()
        if loss is not None:
            st.losses[mb] = loss.detach()
        flags = output_grad_flags(out, recompute) if run.trains else None
        if stage.stashes_to:
            out, flags = skip_flow.send(self.built, sched, s, mb, out, flags, key, run.trains, st)
        if s == sched.num_stages - 1:
            if not run.trains:
                st.outputs[mb] = out
        elif sched.stage_worker[s + 1] == self.built.worker:
            st.local[(s, "F", mb)] = (out, flags)
        else:
            peer = sched.stage_worker[s + 1]
            needs_back = flags or [False] * len(flatten(out)[0])
            sent = self.transport.send_activation(out, s, mb, peer, key, needs_back)
            if run.trains:
                st.sent[(s, mb)] = [
                    TensorMeta.of(t) for t, f in zip(sent, needs_back, strict=True) if f
                ]
                free_sent(out)
        self.events.append(Event(self.built.worker, t0, t1, "F", s, mb))

    def _backward(self, run: Run, a: Action, st: Step) -> None:
        sched, s, mb = run.schedule, a.stage, a.microbatch
        stage = self.built.stages[s]
        grads = None
        if s < sched.num_stages - 1:
            if a in st.posted:
                grads = self.transport.complete(st.posted.pop(a))
            else:
                grads = st.local.pop((s + 1, "B", mb))
        if stage.stashes_to:  # what it stashed gets its gradient from where it was popped
            grads = list(grads or []) + skip_flow.output_grads(self.built, sched, s, mb, st)
        t0 = time.perf_counter()
        head = self._head(run, s, mb, st)  # a recomputed forward recomputes the loss too
        if a.kind == "B":
            in_grads = stage.backward_step(mb, grads, head)
        else:
            in_grads = stage.input_grad_step(mb, grads, head)
        t1 = time.perf_counter()
        if stage.pops_from:
            in_grads = skip_flow.send_input_grads(self.built, sched, s, mb, in_grads, st)
        if s > 0:
            peer = sched.stage_worker[s - 1]
            if peer == self.built.worker:
                st.local[(s, "B", mb)] = in_grads
            else:
                self.transport.send_gradient(in_grads, s, mb, peer)
        st.sent.pop((s, mb), None)
        self.events.append(Event(self.built.worker, t0, t1, a.kind, s, mb))

    # -- timeline -----------------------------------------------------------------------------

    def _event(self, t0: float, a: Action) -> None:
        self.events.append(
            Event(self.built.worker, t0, time.perf_counter(), a.kind, a.stage, a.microbatch)
        )

    def _record_wait(self, t0: float, t1: float) -> None:
        if t1 - t0 > 20e-6:  # ignore waits that found their data already there
            self.events.append(Event(self.built.worker, t0, t1, "wait"))

    def bubble_fraction(self) -> float:
        """The last run's idle fraction over every worker (``Timeline.bubble_fraction`` of
        :meth:`timeline`) from one small all-gather of each worker's busy seconds, first start
        and last end, instead of every event. Collective."""
        events = self.events
        mine = torch.tensor([Timeline(1, events).busy(self.built.worker),
                             min((e.start for e in events), default=math.inf),
                             max((e.end for e in events), default=-math.inf)],
                            dtype=torch.float64, device=self.built.device)  # fmt: skip
        rows = [mine]
        if self.last_schedule.num_workers > 1:
            rows = [torch.empty_like(mine) for _ in range(self.last_schedule.num_workers)]
            dist.all_gather(rows, mine, group=self.built.group)
        busy, start, end = torch.stack(rows).cpu().unbind(1)
        span = float(end.max() - start.min())
        return 1.0 - float(busy.sum()) / (len(rows) * span) if span > 0 else 0.0

    def timeline(self) -> Timeline:
        """Gather every worker's events of the last run into one measured Timeline.

        Collective: call it on every rank. Times are relative to the earliest event."""
        sched, events = self.last_schedule, list(self.events)
        gathered: list[Any] = [events]
        if sched.num_workers > 1:
            gathered = [None] * sched.num_workers
            dist.all_gather_object(gathered, events, group=self.built.group)
        meta = {"schedule": sched.name, "microbatches": sched.num_microbatches,
                "stages": sched.num_stages}  # fmt: skip
        tl = Timeline(sched.num_workers, [e for evs in gathered for e in evs], "measured", meta)
        return tl.shifted()
