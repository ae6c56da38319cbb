"""The public runtime: ``Pipeline`` runs any schedule for real across worker processes.

Every rank of the pipeline group constructs the same ``Pipeline``; each builds only the
stages the schedule places on it, and one loop executes this worker's action list.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.partition import Partition
from layerwise.profile import Balance, LayerSpec, build_layer, is_meta, materialize, resolve_balance
from layerwise.runtime.stage import Stage
from layerwise.runtime.step import StageError, Step, describe_failure, free_sent, split_batch
from layerwise.runtime.ties import Tie
from layerwise.runtime.transport import LOSS_TAG, PLAN_TAG, Transport, open_channels
from layerwise.runtime.tree import TensorMeta, flatten, signature, unflatten
from layerwise.schedules import (
    Action,
    Schedule,
    dependencies,
    generate,
    sequential,
    stream_order_problems,
    validate,
)
from layerwise.simulate import Costs, measured_costs
from layerwise.timeline import Event, Timeline

CHECKPOINT_MODES = ("never", "always", "except_last")
P2P_MODES = ("auto", "tags", "channels")
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
LOOKAHEAD = 2  # receives posted this many actions ahead of need

TiedSpec = tuple[int, str, int, str]  # (layer, parameter name, layer, parameter name)


class Pipeline:
    """Layer-wise model parallelism over the ranks of ``group`` (all ranks by default).

    ``layers``: an ``nn.Sequential``, a list of modules, a list of zero-argument factories,
    or modules on the ``meta`` device. Only this worker's layers are built or kept.
    ``schedule``: a name (``naive``, ``gpipe``, ``1f1b``, ``interleaved-1f1b``, ``zb-h1``)
    or a :class:`~layerwise.schedules.Schedule`. ``balance``: see ``resolve_balance``.
    ``checkpoint``: ``never``, ``always`` or ``except_last`` (every micro-batch but the last
    recomputes its forward during backward). ``tied``: parameters shared by two layers, as
    (layer, name, layer, name); their gradients are summed across the workers that hold them.
    ``timeout``: seconds any wait on a peer may take before raising.
    ``precision``: ``fp32``, or ``bf16`` (forward under bfloat16 autocast; fp32 weights).
    ``parallelize``: called as ``fn(global_layer_index, module)`` on each layer this worker
    builds, e.g. to shard it for tensor parallelism. ``grad_reducer``: an object with
    ``stage_done(stage)`` (called right after a stage's last backward of the step) and
    ``finish()`` (called at the end of the step), e.g. data-parallel gradient averaging.
    ``p2p``: how messages find their receive: ``tags`` (gloo matches every message by its
    tag), ``channels`` (one two-rank process group per stage boundary and direction, where
    messages match in order; needed by NCCL, which ignores tags; every rank of the job must
    then build its pipeline at the same time, since creating groups is collective) or
    ``auto`` (channels unless the group's backend is gloo).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec] | nn.Sequential,
        schedule: str | Schedule = "1f1b",
        microbatches: int = 8,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        balance: Balance = "uniform",
        group: dist.ProcessGroup | None = None,
        checkpoint: str = "never",
        chunks: int | None = None,
        tied: Sequence[TiedSpec] = (),
        device: torch.device | str | None = None,
        timeout: float = 120.0,
        seed: int = 0,
        sample: Any = None,
        precision: str = "fp32",
        parallelize: Callable[[int, nn.Module], nn.Module] | None = None,
        grad_reducer: Any = None,
        p2p: str = "auto",
    ) -> None:
        specs: list[LayerSpec] = (
            list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        )
        if not specs:
            raise ValueError("a pipeline needs at least one layer")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {tuple(PRECISIONS)}, got {precision!r}")
        self.amp_dtype = PRECISIONS[precision]
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_MODES}, got {checkpoint!r}")
        self.group = group
        distributed = dist.is_available() and dist.is_initialized()
        self.worker = dist.get_rank(group) if distributed else 0
        self.num_workers = dist.get_world_size(group) if distributed else 1
        self.schedule = self._make_schedule(schedule, microbatches, chunks)
        self.partition = self._make_partition(specs, balance, sample)
        self.loss_fn = loss_fn
        self.checkpoint = checkpoint
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # NCCL moves only GPU tensors, so scalars shared between workers live on the device
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.parallelize = parallelize
        self.grad_reducer = grad_reducer
        self.stages: dict[int, Stage] = {
            s: self._build_stage(s, specs, seed) for s in self.schedule.stages_of(self.worker)
        }
        self.p2p = self._p2p_mode(p2p, distributed)
        channels = {}
        if self.p2p == "channels" and self.num_workers > 1:
            ranks = [self._global(w) for w in range(self.num_workers)]
            channels = open_channels(self.schedule.stage_worker, self.worker, ranks)
        self.transport = Transport(
            self.worker,
            self.num_workers,
            group,
            self.device,
            timeout,
            self.schedule.num_stages,
            on_wait=self._record_wait,
            channels=channels,
        )
        self._events: list[Event] = []
        self._last_plan: list[Any] | None = None  # the micro-batches' shapes of the last step
        self._last_timeline: Timeline | None = None
        self._ties = self._setup_ties(tied)

    # -- construction -------------------------------------------------------------------------

    def _make_schedule(
        self, schedule: str | Schedule, microbatches: int, chunks: int | None
    ) -> Schedule:
        if isinstance(schedule, Schedule):
            validate(schedule)
            if schedule.num_workers != self.num_workers:
                raise ValueError(
                    f"schedule is for {schedule.num_workers} workers but the group has "
                    f"{self.num_workers}"
                )
            return schedule
        v = chunks or (2 if schedule.startswith("interleaved") else 1)
        return generate(schedule, self.num_workers, microbatches, v)

    def _p2p_mode(self, p2p: str, distributed: bool) -> str:
        if p2p not in P2P_MODES:
            raise ValueError(f"p2p must be one of {P2P_MODES}, got {p2p!r}")
        if p2p == "auto":
            gloo = not distributed or dist.get_backend(self.group) == "gloo"
            p2p = "tags" if gloo else "channels"
        if p2p == "channels":
            problems = stream_order_problems(self.schedule)
            if problems:
                raise ValueError(
                    "messages between workers match in the order they are posted here "
                    "(p2p='channels', as NCCL needs), so every stage must run its forwards and "
                    "its backwards in micro-batch order: " + "; ".join(problems)
                )
        return p2p

    def _make_partition(self, specs: list[LayerSpec], balance: Balance, sample: Any) -> Partition:
        num_stages = self.schedule.num_stages
        if num_stages > len(specs):
            raise ValueError(
                f"{len(specs)} layers cannot fill {num_stages} stages "
                f"({self.num_workers} workers x "
                f"{self.schedule.chunks} chunks): use at most {len(specs)} stages"
            )
        part = resolve_balance(specs, num_stages, balance, sample)
        if isinstance(balance, str) and balance in ("time", "memory") and self.num_workers > 1:
            # measurements differ between processes: everyone takes worker 0's partition
            sizes: list[Any] = [part.sizes]
            dist.broadcast_object_list(sizes, src=self._global(0), group=self.group)
            part = Partition.from_sizes(sizes[0], len(specs))
        return part

    def _build_stage(self, s: int, specs: list[LayerSpec], seed: int) -> Stage:
        r = self.partition.ranges[s]
        built = []
        for i in r:
            spec = specs[i]
            if isinstance(spec, nn.Module) and not is_meta(spec):
                module = spec  # given built: keep its weights exactly
            else:
                # seeded per layer, so weights do not depend on how many workers there are
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed * 1_000_003 + i)
                    module = build_layer(spec)
                    if is_meta(module):
                        module = materialize(module, self.device)
            module = module.to(self.device)
            if self.parallelize is not None:
                module = self.parallelize(i, module)
            built.append(module)
        return Stage(s, r.start, built, self.amp_dtype)

    def _setup_ties(self, tied: Sequence[TiedSpec]) -> list[Tie]:
        """Share tied parameters: one object when both layers live here, else a Tie with the
        peer worker. Ties talk point to point inside the pipeline group, so no extra process
        group is needed and pipelines inside a larger mesh stay independent."""
        ties = []
        for layer_a, name_a, layer_b, name_b in tied:
            wa, wb = (
                self.schedule.stage_worker[self.partition.stage_of(x)] for x in (layer_a, layer_b)
            )
            pa, pb = self._param(layer_a, name_a), self._param(layer_b, name_b)
            if wa == wb:
                if pa is not None and pb is not None:  # one Parameter object serves both layers
                    self._set_param(layer_b, name_b, pa)
                continue
            mine = pa if pa is not None else pb
            if mine is None:
                continue
            peer = wb if self.worker == wa else wa
            tie = Tie(mine, self.transport.global_rank(peer), leader=self.worker == min(wa, wb))
            tie.sync_values(self.group)
            ties.append(tie)
        return ties

    def _layer(self, index: int) -> nn.Module | None:
        stage = self.stages.get(self.partition.stage_of(index))
        return None if stage is None else stage.layers[index - stage.first_layer]

    def _param(self, layer: int, name: str) -> nn.Parameter | None:
        module = self._layer(layer)
        return None if module is None else module.get_parameter(name)

    def _set_param(self, layer: int, name: str, param: nn.Parameter) -> None:
        module = self._layer(layer)
        assert module is not None
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        setattr(owner, attr, param)

    # -- public API ---------------------------------------------------------------------------

    @property
    def is_first(self) -> bool:
        return self.schedule.stage_worker[0] == self.worker

    @property
    def is_last(self) -> bool:
        return self.schedule.stage_worker[-1] == self.worker

    def parameters(self) -> Iterator[nn.Parameter]:
        """Yield this worker's parameters, each once."""
        seen: set[int] = set()
        for s in sorted(self.stages):
            for p in self.stages[s].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Yield ('<global layer index>.<name>', parameter) for this worker's layers."""
        seen: set[int] = set()
        for s in sorted(self.stages):
            stage = self.stages[s]
            for i, layer in enumerate(stage.layers):
                for name, p in layer.named_parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield f"{stage.first_layer + i}.{name}", p

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Pipeline:
        for stage in self.stages.values():
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    # -- one step -----------------------------------------------------------------------------

    def _micro_batches(self, inputs: Any) -> list[Any]:
        """Cut the batch into micro-batches on the first worker; None placeholders elsewhere."""
        m = self.schedule.num_microbatches
        if not self.is_first:
            return [None] * m
        if inputs is None:
            raise ValueError(f"worker {self.worker} holds the first stage and needs the inputs")
        return split_batch(inputs, m)

    def _share_plan(self, micro_batches: list[Any]) -> list[Any]:
        """Tell every worker the shape signature of each micro-batch (first worker knows).

        Shapes rarely change between steps, so the first worker sends one number saying
        whether they did (point to point: it does not wait for the others to receive it) and
        broadcasts the pickled plan only when they did."""
        plan: list[Any] | None = None
        if self.is_first:
            plan = [(flatten(mb)[0][0].shape[0], signature(mb)) for mb in micro_batches]
        if self.num_workers > 1:
            first = self.schedule.stage_worker[0]
            changed = self.transport.share_number(
                float(plan != self._last_plan), first, PLAN_TAG, "the step's shapes"
            )
            if changed:
                box = [plan]
                dist.broadcast_object_list(box, src=self._global(first), group=self.group)
                plan = box[0]
            else:
                plan = self._last_plan
        assert plan is not None
        self._last_plan = plan
        return plan

    def _record_wait(self, t0: float, t1: float) -> None:
        if t1 - t0 > 20e-6:  # ignore waits that found their data already there
            self._events.append(Event(self.worker, t0, t1, "wait"))

    def train_step(self, inputs: Any = None, targets: Any = None) -> float:
        """Run one global batch forward and backward; accumulate this worker's gradients.

        Returns the batch's mean loss on every rank. The optimizer step is the caller's.
        """
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss_fn")
        try:
            return self._run(inputs, targets)
        except StageError as err:
            self.transport.report_failure(str(err))
            raise

    def _run(self, inputs: Any, targets: Any) -> float:
        """Execute this worker's action list once: one global batch forward and backward."""
        st = self._start_step(inputs, targets)
        acts = self.schedule.actions[self.worker]
        # where each stage's gradients become final: its last B or W of the step
        grads_final = {a.stage: pos for pos, a in enumerate(acts) if a.kind in ("B", "W")}
        for pos, a in enumerate(acts):
            # post receives for this action and the next few, so data flows while we compute
            for k, ahead in enumerate(acts[pos : pos + 1 + LOOKAHEAD]):
                if not self._post(ahead, st, now=k == 0):
                    break  # later receives wait, so each stream is posted in order
            if a.kind == "F":
                self._forward(a, st)
            elif a.kind in ("B", "I"):
                self._backward(a, st)
            else:
                t0 = time.perf_counter()
                self.stages[a.stage].weight_grad_step(a.microbatch)
                self._events.append(
                    Event(self.worker, t0, time.perf_counter(), "W", a.stage, a.microbatch)
                )
            if self.grad_reducer is not None and grads_final[a.stage] == pos:
                self.grad_reducer.stage_done(self.stages[a.stage])
            self.transport.reap_sends()
        self.transport.reap_sends(block=True)
        self.transport.end_step()
        if self.grad_reducer is not None:
            self.grad_reducer.finish()
        self._reduce_tied()
        return self._share_loss(st.losses)

    def _start_step(self, inputs: Any, targets: Any) -> Step:
        """Agree on the micro-batches' shapes and cut this worker's share of the batch."""
        m = self.schedule.num_microbatches
        micro_batches = self._micro_batches(inputs)
        plan = self._share_plan(micro_batches)
        st = Step(plan=plan, rows=[r for r, _ in plan], inputs=micro_batches)
        if self.is_last:
            if targets is None:
                raise ValueError(f"worker {self.worker} holds the last stage and needs the targets")
            st.targets = split_batch(targets, m)
            got = [flatten(t)[0][0].shape[0] for t in st.targets]
            if got != st.rows:
                raise ValueError(
                    f"targets split into micro-batches of {got} rows, inputs into {st.rows}"
                )
        self._events = []
        return st

    def _head(self, stage: int, mb: int, st: Step) -> Callable[[Any], torch.Tensor] | None:
        """The last stage's loss for micro-batch ``mb``, weighted by its share of the rows."""
        if stage != self.schedule.num_stages - 1:
            return None
        assert self.loss_fn is not None
        loss_fn, target, weight = self.loss_fn, st.targets[mb], st.rows[mb] / sum(st.rows)
        return lambda out: loss_fn(out, target) * weight

    def _post(self, a: Action, st: Step, now: bool) -> bool:
        """Post the receive that action ``a`` will need from another worker, if any.

        Return False if that receive cannot be posted yet (so none after it may be)."""
        sched = self.schedule
        # a backward whose forward has not sent yet (or sent to this same worker) has nothing
        # to post now; a later one of its stream cannot have sent either, so order holds
        if a in st.posted or not (a.kind == "F" or (a.stage, a.microbatch) in st.sent):
            return True
        remote = [
            sched.stage_worker[d.stage]
            for d in dependencies(a, sched)
            if d.stage != a.stage and sched.stage_worker[d.stage] != self.worker
        ]
        if not remote:
            return True
        peer = remote[0]
        if a.kind == "F":
            signature = st.plan[a.microbatch][1]
            if not now and not self.transport.knows(a.stage - 1, signature):
                return False  # new shapes: metadata must be received in order, not ahead
            st.posted[a] = self.transport.post_activation(
                a.stage - 1, a.microbatch, peer, signature
            )
        elif a.kind in ("B", "I"):
            like = st.sent[(a.stage, a.microbatch)]
            st.posted[a] = self.transport.post_gradient(like, a.stage + 1, a.microbatch, peer)
        return True

    def _forward(self, a: Action, st: Step) -> None:
        s, mb = a.stage, a.microbatch
        stage = self.stages[s]
        if s == 0:
            x = st.inputs[mb]
        elif a in st.posted:
            x = self.transport.complete(st.posted.pop(a))
        else:
            x = st.local.pop((s - 1, "F", mb))
        m = self.schedule.num_microbatches
        ckpt = self.checkpoint == "always" or (self.checkpoint == "except_last" and mb < m - 1)
        t0 = time.perf_counter()
        try:
            out, loss = stage.forward_step(mb, x, self._head(s, mb, st), ckpt,
                                           capture=self.schedule.splits_backward(s))  # fmt: skip
        except (RuntimeError, ValueError, TypeError) as err:
            raise StageError(describe_failure(stage, mb, x, s, err)) from err
        t1 = time.perf_counter()
        if loss is not None:
            st.losses[mb] = loss.detach()
        if s < self.schedule.num_stages - 1:
            peer = self.schedule.stage_worker[s + 1]
            if peer == self.worker:
                st.local[(s, "F", mb)] = out
            else:
                sent = self.transport.send_activation(out, s, mb, peer, st.plan[mb][1])
                st.sent[(s, mb)] = [TensorMeta.of(t) for t in sent if t.is_floating_point()]
                free_sent(out)
        self._events.append(Event(self.worker, t0, t1, "F", s, mb))

    def _backward(self, a: Action, st: Step) -> None:
        s, mb = a.stage, a.microbatch
        stage = self.stages[s]
        grads = None
        if s < self.schedule.num_stages - 1:
            if a in st.posted:
                grads = self.transport.complete(st.posted.pop(a))
            else:
                grads = st.local.pop((s + 1, "B", mb))
        t0 = time.perf_counter()
        head = self._head(s, mb, st)
        if a.kind == "B":
            in_grads = stage.backward_step(mb, grads, head)
        else:
            in_grads = stage.input_grad_step(mb, grads, head)
        t1 = time.perf_counter()
        if s > 0:
            peer = self.schedule.stage_worker[s - 1]
            if peer == self.worker:
                st.local[(s, "B", mb)] = in_grads
            else:
                self.transport.send_gradient(in_grads, s, mb, peer)
        st.sent.pop((s, mb), None)
        self._events.append(Event(self.worker, t0, t1, a.kind, s, mb))

    def _reduce_tied(self) -> None:
        for tie in self._ties:
            tie.sum_grads(self.group)

    def _share_loss(self, losses: dict[int, torch.Tensor]) -> float:
        total = float(sum(v.double() for v in losses.values())) if self.is_last else 0.0
        return self._from_last(total)

    def _global(self, worker: int) -> int:
        """Return the global rank of pipeline worker ``worker``."""
        return dist.get_global_rank(self.group, worker) if self.group is not None else worker

    def _from_last(self, number: float) -> float:
        """Return the last stage's worker's ``number`` on every worker."""
        if self.num_workers == 1:
            return number
        last = self.schedule.stage_worker[-1]
        return self.transport.share_number(number, last, LOSS_TAG, "the loss")

    def module(self) -> nn.ModuleDict:
        """Return this worker's layers as one module keyed by global layer index, so that
        state dicts name parameters the same whatever the partition ('3.attn.q_proj.weight')."""
        return nn.ModuleDict(
            {
                str(st.first_layer + i): layer
                for st in self.stages.values()
                for i, layer in enumerate(st.layers)
            }
        )

    def owns_tied_copy(self, param: nn.Parameter) -> bool:
        """Return False for the copy of a tied parameter held by the higher worker, so that
        norms and counts see each tied tensor once."""
        return all(tie.leader or tie.param is not param for tie in self._ties)

    @torch.no_grad()
    def evaluate(self, inputs: Any = None, targets: Any = None) -> float:
        """Return the mean loss of ``inputs`` against ``targets`` (no gradients) on every rank."""
        if self.loss_fn is None:
            raise ValueError("evaluate needs a loss_fn")
        out = self.forward(inputs)
        loss = 0.0
        if self.is_last:
            if targets is None:
                raise ValueError(f"worker {self.worker} holds the last stage and needs the targets")
            loss = float(self.loss_fn(out, targets))
        return self._from_last(loss)

    # -- inference ----------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, inputs: Any = None) -> Any:
        """Run ``inputs`` forward through every stage (one micro-batch per schedule slot);
        return the concatenated output on the last worker and None elsewhere."""
        sched = self.schedule
        m = sched.num_microbatches
        mb_inputs = self._micro_batches(inputs)
        plan = self._share_plan(mb_inputs)
        outputs: dict[int, Any] = {}
        local: dict[tuple[int, int], Any] = {}
        fwd = [a for a in sched.actions[self.worker] if a.kind == "F"]
        for a in fwd:
            s, mb = a.stage, a.microbatch
            if s == 0:
                x = mb_inputs[mb]
            elif sched.stage_worker[s - 1] == self.worker:
                x = local.pop((s - 1, mb))
            else:
                peer = sched.stage_worker[s - 1]
                x = self.transport.complete(
                    self.transport.post_activation(s - 1, mb, peer, plan[mb][1])
                )
            out = self.stages[s].run(x)
            if s == sched.num_stages - 1:
                outputs[mb] = out
            elif sched.stage_worker[s + 1] == self.worker:
                local[(s, mb)] = out
            else:
                self.transport.send_activation(out, s, mb, sched.stage_worker[s + 1], plan[mb][1])
            self.transport.reap_sends()
        self.transport.reap_sends(block=True)
        self.transport.end_step()
        if not self.is_last:
            return None
        parts = [outputs[i] for i in range(m)]
        first = flatten(parts[0])
        cat = [torch.cat([flatten(p)[0][k] for p in parts]) for k in range(len(first[0]))]
        return unflatten(cat, first[1])

    # -- timeline -----------------------------------------------------------------------------

    def local_events(self) -> list[Event]:
        """This worker's events from the last step (wall-clock seconds)."""
        return list(self._events)

    def timeline(self) -> Timeline:
        """Gather every worker's events of the last step into one measured Timeline.

        Collective: call it on every rank. Times are relative to the earliest event.
        """
        events = self.local_events()
        gathered: list[Any] = [events]
        if self.num_workers > 1:
            gathered = [None] * self.num_workers
            dist.all_gather_object(gathered, events, group=self.group)
        tl = Timeline(
            self.num_workers,
            [e for evs in gathered for e in evs],
            "measured",
            {
                "schedule": self.schedule.name,
                "microbatches": self.schedule.num_microbatches,
                "stages": self.schedule.num_stages,
            },
        )
        return tl.shifted()

    # -- prediction ---------------------------------------------------------------------------

    def calibrate(self, inputs: Any = None, targets: Any = None, steps: int = 3) -> Costs:
        """Measure this pipeline's costs before training on it; return them for the simulator.

        Collective. Runs ``steps`` passes of one micro-batch of ``inputs``/``targets`` (the
        first of the ``m`` the schedule would cut) through the stages one after another
        (``schedules.sequential``): each stage's forward and backward (or I and W) alone, and
        every message while its receiver has nothing else to do. Returns each stage's mean
        costs and the median hand-off (``simulate.measured_costs``), so that
        ``lw.simulate(pipe.schedule, pipe.calibrate(x, y))`` predicts a step of this schedule,
        or of any other with the same stages. Gradients, buffers (batch-norm statistics),
        random state and the gradient reducer are left as they were. On a machine where the
        workers outnumber the cores, a real step also waits for cores, which this cannot see.
        """
        if steps < 1:
            raise ValueError(f"calibrate needs at least one step, got {steps}")
        m = self.schedule.num_microbatches
        x = split_batch(inputs, m)[0] if self.is_first and inputs is not None else inputs
        y = split_batch(targets, m)[0] if self.is_last and targets is not None else targets
        kept = ("schedule", "grad_reducer", "checkpoint", "_last_plan", "_events")
        saved = {name: getattr(self, name) for name in kept}
        grads = [(p, p.grad) for p in self.parameters()]
        # forwards in training mode may update buffers (batch-norm statistics): keep them
        buffers = [(b, b.detach().clone()) for st in self.stages.values() for b in st.buffers()]
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state() if self.device.type == "cuda" else None
        timelines = []
        try:
            self.schedule, self.grad_reducer = sequential(saved["schedule"]), None
            if self.checkpoint == "except_last":  # one micro-batch is the last: recompute it
                self.checkpoint = "always"  # as all but one of the real step's will be
            for _ in range(steps + 1):  # the first pass exchanges shapes: not counted
                self.zero_grad()
                self.train_step(x, y)
                timelines.append(self.timeline())
            return measured_costs(timelines[1:], self.schedule)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)
            for p, g in grads:
                p.grad = g
            with torch.no_grad():
                for b, before in buffers:
                    b.copy_(before)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng)
