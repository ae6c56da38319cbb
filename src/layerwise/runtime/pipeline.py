"""The public runtime: ``Pipeline`` runs any schedule for real across worker processes.

Every rank of the pipeline group constructs the same ``Pipeline``. Building (partition,
stages, ties, transport) is :mod:`layerwise.runtime.builder`'s; running is the one loop of
:mod:`layerwise.runtime.executor`, which ``train_step``, ``forward``, ``evaluate`` and
``calibrate`` all call with a different schedule.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from layerwise.profile import Balance, LayerSpec
from layerwise.runtime import builder
from layerwise.runtime.builder import TiedSpec, agree
from layerwise.runtime.executor import (
    LOSS_REDUCTIONS,
    RECOMPUTE_MODES,
    Executor,
    LossReduction,
    Run,
)
from layerwise.runtime.step import split_batch
from layerwise.runtime.transport import LOSS_TAG
from layerwise.schedules import Schedule, forward_only, sequential, validate
from layerwise.simulate import Costs, dispatch_time, measured_costs
from layerwise.timeline import Event, Timeline


class Pipeline:
    """Layer-wise model parallelism over the ranks of ``group`` (all ranks by default).

    ``layers``: an ``nn.Sequential``, a list of modules, a list of zero-argument factories,
    or modules on the ``meta`` device. Only this worker's layers are built or kept.
    ``schedule``: a registered name (``layerwise simulate --help`` lists them) or a
    :class:`~layerwise.schedules.Schedule`; ``chunks``: stages per worker (the schedule's
    default when None). ``balance``: see ``resolve_balance``.
    ``recompute``: ``never``, ``always`` or ``except_last`` (every micro-batch but the last
    recomputes its forward during backward); ``checkpoint`` is its former name.
    ``tied``: parameters shared by two layers, as (layer, name, layer, name); their gradients
    are summed across the workers that hold them. Layers given as modules that hold the same
    Parameter object are tied so without being named here.
    ``loss_reduction``: how the micro-batches' mean losses make the step's: ``rows`` (each
    weighs by its samples), ``tokens`` (by its target elements other than -100), or a function
    of a micro-batch's targets returning its weight; the step's loss is then the mean over
    the whole batch that the loss function would give on it, e.g. over its tokens.
    ``timeout``: seconds any wait on a peer may take before raising.
    ``precision``: ``fp32``, or ``bf16`` (forward under bfloat16 autocast; fp32 weights).
    ``parallelize``: called as ``fn(global_layer_index, module)`` on each layer this worker
    builds, e.g. to shard it for tensor parallelism. ``grad_reducer``: an object with
    ``stage_done(stage)`` (called right after a stage's last backward of the step) and
    ``finish()`` (called at the end of the step), e.g. data-parallel gradient averaging
    (``layerwise.parallel.data.GradReducer``). One that also has ``replica_share(weight)``
    makes replicas count by their batches' weight when the loss is not weighted by rows:
    each replica's loss is then its share of the global batch's, so the mean of the
    replicas' losses is the loss over every token of the global batch.
    ``p2p``: the transport, i.e. how messages find their receive: ``tags`` (gloo matches
    every message by its tag), ``channels`` (one two-rank process group per stage boundary
    and direction, where messages match in order; needed by NCCL, which ignores tags; every
    rank of the job must then build its pipeline at the same time, since creating groups is
    collective) or ``auto`` (channels unless the group's backend is gloo).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec] | nn.Sequential,
        schedule: Any = "1f1b",
        microbatches: int = 8,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        balance: Balance = "uniform",
        group: dist.ProcessGroup | None = None,
        recompute: str = "never",
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
        checkpoint: str | None = None,
        loss_reduction: LossReduction = "rows",
    ) -> None:
        if checkpoint is not None:  # the former name of recompute
            warnings.warn("Pipeline(checkpoint=...) is now Pipeline(recompute=...)",
                          DeprecationWarning, stacklevel=2)  # fmt: skip
            recompute = checkpoint
        if recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
        if not callable(loss_reduction) and loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS} or a function of "
                             f"a micro-batch's targets, got {loss_reduction!r}")  # fmt: skip
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        # NCCL moves only GPU tensors, so scalars shared between workers live on the device
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.built = builder.build(
            layers, schedule=schedule, microbatches=microbatches, chunks=chunks,
            balance=balance, sample=sample, group=group, device=self.device, seed=seed,
            precision=precision, parallelize=parallelize, tied=tied, p2p=p2p, timeout=timeout,
        )  # fmt: skip
        self.executor = Executor(self.built)
        self.loss_fn = loss_fn
        self.recompute = recompute
        self.grad_reducer = grad_reducer
        self.loss_reduction = loss_reduction

    @classmethod
    def from_hf(
        cls,
        model_or_config: Any,
        checkpoint: str | None = None,
        family: Any = None,
        **options: Any,
    ) -> Pipeline:
        """Return the pipeline of a Hugging Face causal LM, with no glue to write.

        ``model_or_config``: a built model (its own modules and weights become the layers), a
        configuration (object or dict), or a path (a config.json, or a ``save_pretrained``
        directory, whose weights are read). From a configuration, each worker builds its
        layers on the meta device and materializes only its own: initialized as the model
        initializes itself, or read tensor by tensor from ``checkpoint`` (a save_pretrained
        directory). ``options`` are the Pipeline's; the loss (the model's causal-LM loss,
        averaged over the batch's counted tokens), ``loss_reduction`` and the tied embeddings
        come from the model. ``family``: a subclass of
        :class:`~layerwise.models.hf.HFDecoderFamily` for a model laid out otherwise (the
        default finds the pieces of GPT-2, Llama and their kin, and names what it cannot
        place). ``train_step(input_ids, labels)`` then returns
        ``model(input_ids, labels=labels).loss``; inputs may also be a dict with
        ``input_ids``, ``attention_mask`` and ``position_ids``. Steps may change length
        freely. Packed rows (no mask, position ids restarting at 0 where each document
        begins) keep every document to itself, as ``model(..., use_cache=False)`` does: with
        its default cache, Hugging Face's own forward skips the document masks.
        Needs ``transformers`` (``layerwise[hf]``).
        """
        from layerwise.models.hf import hf_family

        return cls.of_family(hf_family(model_or_config, checkpoint, family), **options)

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> Pipeline:
        """Return the pipeline of the model directory ``path``: one that save_pretrained
        wrote (as :meth:`from_hf`) or that ``layerwise export`` wrote from our GPT; each
        worker reads only its own layers' weights."""
        from layerwise.models.pretrained import family_from_dir

        return cls.of_family(family_from_dir(path), **options)

    @classmethod
    def of_family(cls, family: Any, **options: Any) -> Pipeline:
        """Return the pipeline of a model family's layers, with its loss and ties."""
        options.setdefault("loss_fn", family.loss_fn)
        options.setdefault("loss_reduction", family.loss_reduction())
        tied = [*options.pop("tied", ()), *family.tied_parameters()]
        return cls(family.layers(), tied=tied, **options)

    # -- what this worker holds ---------------------------------------------------------------

    @property
    def schedule(self) -> Any:
        return self.built.schedule

    @property
    def partition(self) -> Any:
        return self.built.partition

    @property
    def stages(self) -> dict[int, Any]:
        return self.built.stages

    @property
    def transport(self) -> Any:
        return self.built.transport

    @property
    def group(self) -> dist.ProcessGroup | None:
        return self.built.group

    @property
    def worker(self) -> int:
        return self.built.worker

    @property
    def num_workers(self) -> int:
        return self.built.num_workers

    @property
    def checkpoint(self) -> str:
        """The former name of ``recompute``."""
        return self.recompute

    @property
    def is_first(self) -> bool:
        return self.executor.holds_first(self.schedule)

    @property
    def is_last(self) -> bool:
        return self.executor.holds_last(self.schedule)

    def parameters(self) -> Iterator[nn.Parameter]:
        """Yield this worker's parameters, each once."""
        for _, p in self.named_parameters():
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
        return all(tie.leader or tie.param is not param for tie in self.built.ties)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> Pipeline:
        for stage in self.stages.values():
            stage.train(mode)
        return self

    def eval(self) -> Pipeline:
        return self.train(False)

    def reschedule(self, schedule: Schedule) -> None:
        """Run ``schedule`` from now on: another order of the same stages on the same workers
        (for example one searched for the costs :meth:`calibrate` measured). Collective:
        every worker must switch to the same schedule, which is checked."""
        old = self.built.schedule
        if schedule.skips != old.skips:  # the skips come from the model, not the order
            schedule = dataclasses.replace(schedule, skips=old.skips)
        validate(schedule)
        if schedule.stage_worker != old.stage_worker:
            raise ValueError(
                f"schedule {schedule.name!r} places stages on workers as "
                f"{list(schedule.stage_worker)}, but this pipeline's stages are built as "
                f"{list(old.stage_worker)}; build a new Pipeline for another placement"
            )
        if self.num_workers > 1:
            agree({"schedule": schedule.name, "micro-batches": schedule.num_microbatches,
                   "action lists": [" ".join(map(str, a)) for a in schedule.actions]},
                  self.worker, self.group)  # fmt: skip
        self.built.schedule = schedule

    # -- life cycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Wait until every message this worker sent has been taken (bounded by the timeout);
        the pipeline cannot run afterwards. Closing twice does nothing."""
        if self.executor.closed:
            return
        self.executor.closed = True
        self.built.transport.close(wait=True)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # dropped without close(): keep the sends still in flight alive, never block here
        executor = getattr(self, "executor", None)
        if executor is not None and not executor.closed:
            executor.closed = True
            self.built.transport.close(wait=False)

    # -- running ------------------------------------------------------------------------------

    def _training_run(self) -> Run:
        if self.loss_fn is None:
            raise ValueError("train_step needs a loss_fn")
        return Run(self.schedule, self.loss_fn, self.recompute, self.grad_reducer,
                   self.loss_reduction)  # fmt: skip

    def train_step(self, inputs: Any = None, targets: Any = None) -> float:
        """Run one global batch forward and backward; accumulate this worker's gradients.

        Returns the batch's mean loss on every rank. The optimizer step is the caller's.
        """
        return float(self.executor.run(self._training_run(), inputs, targets))

    @torch.no_grad()
    def forward(self, inputs: Any = None) -> Any:
        """Run ``inputs`` forward through every stage (one micro-batch per schedule slot);
        return the concatenated output on the last worker and None elsewhere."""
        return self.executor.run(Run(forward_only(self.schedule)), inputs)

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
        return self.executor.from_last(self.schedule, loss, LOSS_TAG, "the loss")

    # -- timeline -----------------------------------------------------------------------------

    def local_events(self) -> list[Event]:
        """This worker's events from the last run (wall-clock seconds)."""
        return list(self.executor.events)

    def bubble_fraction(self) -> float:
        """The last run's idle fraction, as ``timeline().bubble_fraction()`` gives it, at the
        cost of one small all-gather (for every step's record). Collective."""
        return self.executor.bubble_fraction()

    def timeline(self) -> Timeline:
        """Gather every worker's events of the last run into one measured Timeline.

        Collective: call it on every rank. Times are relative to the earliest event.
        """
        return self.executor.timeline()

    # -- prediction ---------------------------------------------------------------------------

    def calibrate(self, inputs: Any = None, targets: Any = None, steps: int = 3) -> Costs:
        """Measure this pipeline's costs before training on it; return them for the simulator.

        Collective. Runs ``steps`` passes of one micro-batch of ``inputs``/``targets`` (the
        first of the ``m`` the schedule would cut) through the stages one after another
        (``schedules.sequential``): each stage's forward and backward (or I and W) alone, and
        every message while its receiver has nothing else to do. Then two steps of the
        schedule itself, on the whole batch (the second counted), for the runtime's own time
        between actions (``simulate.dispatch_time``: posting receives, reaping sends; a pass
        of one micro-batch has too few actions whose inputs are ready to tell, and the more
        stages a worker holds, the more it weighs). Returns each stage's mean costs with that
        dispatch time, and the median hand-off (``simulate.measured_costs``), so that
        ``lw.simulate(pipe.schedule, pipe.calibrate(x, y))`` predicts a step of this schedule,
        or of any other with the same stages. Gradients, buffers (batch-norm statistics),
        random state and the gradient reducer are left as they were. On a machine where the
        workers outnumber the cores, a real step also waits for cores, which the stages' costs,
        each timed alone, do not show.
        """
        if steps < 1:
            raise ValueError(f"calibrate needs at least one step, got {steps}")
        m = self.schedule.num_microbatches
        x = split_batch(inputs, m)[0] if self.is_first and inputs is not None else inputs
        y = split_batch(targets, m)[0] if self.is_last and targets is not None else targets
        # one micro-batch is the last: recompute it as all but one of a real step's will be
        recompute = "always" if self.recompute == "except_last" else self.recompute
        training = self._training_run()
        run = Run(sequential(self.schedule), training.loss_fn, recompute,
                  loss_reduction=training.loss_reduction)  # fmt: skip
        whole = Run(
            self.schedule, training.loss_fn, self.recompute, loss_reduction=training.loss_reduction
        )  # no reducer: replicas stay apart
        with _ModelStateKept(self):
            timelines = []
            for _ in range(steps + 1):  # the first pass exchanges shapes: not counted
                self.zero_grad()
                self.executor.run(run, x, y)
                timelines.append(self.executor.timeline())
            for _ in range(2):  # the first one meets the batch's shapes: not counted
                self.zero_grad()
                self.executor.run(whole, inputs, targets)
            dispatch = dispatch_time([self.executor.timeline()], self.schedule)
        return measured_costs(timelines[1:], run.schedule, dispatch)


class _ModelStateKept:
    """Put back what a measuring run changes in the model: gradients, module buffers
    (batch-norm statistics) and random state."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def __enter__(self) -> None:
        pipe = self.pipe
        self.grads = [(p, p.grad) for p in pipe.parameters()]
        # forwards in training mode may update buffers (batch-norm statistics): keep them
        self.buffers = [
            (b, b.detach().clone()) for st in pipe.stages.values() for b in st.buffers()
        ]
        self.rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if pipe.device.type == "cuda" else None

    def __exit__(self, *exc: object) -> None:
        for p, g in self.grads:
            p.grad = g
        with torch.no_grad():
            for b, before in self.buffers:
                b.copy_(before)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(self.cuda_rng)
