"""The batching engine: fuse force requests from many concurrent calculations into batched model calls.

One `BatchingEngine` exists per loaded potential (and so per device), created lazily and shared
by the whole process (`engine_for`). It has the same ``evaluate(list[Atoms]) -> list[Evaluation]``
interface as `Potential`, so ``potential.calculator(engine)`` is an ordinary ASE
calculator and ASE's optimizers, filters and integrators run unchanged on top of it. The batched stepping of
`matcalc.batched` sends one request per step for all the structures it advances, through
`BatchingEngine.evaluate_partial` (a structure whose evaluation fails gets its exception, the others
their results).

How it works
------------
Any number of threads call `BatchingEngine.evaluate`; each call becomes a *request* and the
calling thread blocks. One daemon *dispatcher* thread takes whatever is pending, packs it into one
batch of at most `budget_atoms` atoms, runs **one** model call, and hands every
caller its slice. While the model runs, new requests queue up for the next batch.

Coalescing policy (documented, tested): the engine remembers the *active callers* — threads that
submitted recently. When requests are pending, the dispatcher starts the next batch as soon as

1. the pending atoms fill the budget, or
2. every active caller has a request pending (nobody else is coming), or
3. ``max_wait_s`` has passed since the later of the oldest pending request and the end of the previous
   batch (the time callers get to come back with their next step).

Active callers that did not submit within that wait are dropped from the active set (they finished, or
are busy elsewhere) and rejoin when they submit again, so a finished calculation costs at most one wait.
A single caller is never delayed (it is the only active caller). By default ``max_wait_s`` adapts to the
callers: twice their typical *think time* (the gap between getting a result and sending the next request,
i.e. one optimizer or MD step of Python work; exponential moving average), clamped to [0.5 ms, 50 ms].
On a CPU the processor is busy with that Python work while the dispatcher waits, so the wait costs little;
on a GPU one fused call is worth far more than the few ms of idle device. Set a fixed value with
``max_wait_s=`` or ``MATCALC_BATCH_WAIT_MS``.

Packing: requests are taken first-come first-served; a request is kept whole in one batch whenever it
fits, later (smaller) requests fill the remaining budget, and only a request larger than the whole budget
is split across batches. A single structure larger than the budget is evaluated alone.

Atom budget: ``budget_atoms=`` or ``MATCALC_BATCH_ATOMS``; otherwise on CUDA it is derived from free
device memory (``torch.cuda.mem_get_info``) as ``free GiB x GPU_MEMORY_FRACTION x atoms_per_gb``
(``ATOMS_PER_GB`` = 90 by default, i.e. ~11 MiB of activations per atom, measured for CHGNet with forces
and stress on MOF graphs; override with ``MATCALC_ATOMS_PER_GB``); on CPU it is `CPU_BUDGET_ATOMS`.
Either default is capped by the potential's own ``max_batch_atoms`` (the adapter's limit).

Memory safety: a batch never exceeds the budget (except one oversize structure alone). An out-of-memory
error (``torch.cuda.OutOfMemoryError`` or a ``RuntimeError`` saying "out of memory") splits the batch in
halves and retries them, and lowers the budget so later batches fit. Any other model error on a batch of
several structures retries each structure alone, so an exception reaches only the caller whose structure
caused it.

Lanes (CPU): a potential that may be called from several threads at once (``Potential.concurrent_calls``,
e.g. CHGNet) gets one dispatcher *lane* per core the callers use (their torch thread count). Each lane
takes its own batches from the same queue, and a call runs with ``threads // busy lanes`` torch threads:
one calculation alone still uses every core (intra-op), several run side by side (one core each), which
on a CPU beats intra-op parallelism for MOF-sized graphs. GPUs and other potentials have one lane.

Energies only: `BatchingEngine.energies` queues an energy-only request (``Potential.energies``: no
forces or stress where the model can skip them, e.g. CHGNet's forward pass without the backward one); batches
hold requests of one kind, so energy-only requests are fused with each other, under the same budget and lanes.

Disable batching (A/B comparisons) with ``MATCALC_BATCHING=0`` or `set_enabled` / `disabled`;
calculations then call the potential directly.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from ase import Atoms

from matcalc.models.base import Evaluation, Potential
from matcalc.switches import Switch

log = logging.getLogger(__name__)

ENV_ENABLED = "MATCALC_BATCHING"
ENV_BUDGET_ATOMS = "MATCALC_BATCH_ATOMS"
ENV_WAIT_MS = "MATCALC_BATCH_WAIT_MS"
ENV_ATOMS_PER_GB = "MATCALC_ATOMS_PER_GB"
ENV_LANES = "MATCALC_BATCH_LANES"

CPU_BUDGET_ATOMS = 32
"""Default atom budget on CPU: small on purpose. On a CPU, fusing only pays while the per-call overhead
dominates (tiny cells: 32 Si8 cells fused ran 2.8x faster); for MOF-sized graphs (22-54 atoms, ~1500-2500
CHGNet edges) a fused CHGNet call was *slower* per structure than single calls on the 2-core machine
(8 cells: 2.6-3.0 s one by one, 5.0-5.5 s as one batch; relax_many with pairs fused: 0.53x), so on a CPU
MOF cells are not fused (each call holds one) while tiny cells still are. GPUs get a budget from free
memory instead. See benchmarks/README.md."""
ATOMS_PER_GB = 90
"""GPU heuristic: atoms per GiB of free device memory. CHGNet with forces and stress on MOF graphs was
measured at ~11 MB per atom (a 2048-atom CPU batch peaked above 22 GB), so ~90 atoms/GiB."""
GPU_MEMORY_FRACTION = 0.8
"""Share of the free device memory (at engine creation) the budget may plan for."""
MIN_BUDGET_ATOMS = 64
MAX_BUDGET_ATOMS = 500_000
WAIT_THINK_FACTOR = 2.0
"""Adaptive ``max_wait_s``: this multiple of the callers' mean think time ..."""
THINK_EMA_ALPHA = 0.2
MIN_WAIT_S = 0.0005
MAX_WAIT_S = 0.05
"""... clamped to [MIN_WAIT_S, MAX_WAIT_S]."""
_POLL_S = 1.0
_NO_FORCES = np.zeros((0, 3))


@dataclass
class EngineStats:
    """Counters of one engine. Times in seconds; ``calls`` are fused model calls made by the engine."""

    budget_atoms: int = 0
    requests: int = 0
    """``evaluate`` calls received."""
    structures: int = 0
    """Structures requested (sum over requests)."""
    calls: int = 0
    """Model calls, including failed ones and OOM/error retries."""
    structures_per_call: list[int] = field(default_factory=list)
    atoms_per_call: list[int] = field(default_factory=list)
    fill_per_call: list[float] = field(default_factory=list)
    """Atoms of each call divided by the budget at that time."""
    wait_s: float = 0.0
    """Sum over requests of the time from submission to the start of their first batch."""
    model_time_s: float = 0.0
    """Time inside the model (``Potential._evaluate_batch``), summed over calls."""
    oom_splits: int = 0
    """Batches split in halves after an out-of-memory error."""
    error_retries: int = 0
    """Batches re-run one structure at a time after a (non-OOM) model error."""
    failed_structures: int = 0
    """Structures whose evaluation raised (the error went to their caller)."""
    dropped_callers: int = 0
    """Active callers that did not come back within the wait (finished or busy elsewhere)."""
    think_s: float = 0.0
    """Moving average of the callers' think time (result received -> next request), seconds."""

    @property
    def mean_batch_size(self) -> float:
        """Mean structures per model call (0 before the first call)."""
        return sum(self.structures_per_call) / len(self.structures_per_call) if self.structures_per_call else 0.0

    @property
    def mean_atoms_per_call(self) -> float:
        return sum(self.atoms_per_call) / len(self.atoms_per_call) if self.atoms_per_call else 0.0

    @property
    def mean_fill(self) -> float:
        """Mean fill ratio of the atom budget (0..1)."""
        return sum(self.fill_per_call) / len(self.fill_per_call) if self.fill_per_call else 0.0

    @property
    def max_atoms_per_call(self) -> int:
        return max(self.atoms_per_call, default=0)

    def summary(self) -> dict[str, Any]:
        """Scalar counters only (for logs and benchmark output)."""
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, list)}
        d.update(mean_batch_size=self.mean_batch_size, mean_atoms_per_call=self.mean_atoms_per_call,
                 mean_fill=self.mean_fill, max_atoms_per_call=self.max_atoms_per_call)
        return d


def is_out_of_memory(exc: BaseException) -> bool:
    """True for ``torch.cuda.OutOfMemoryError`` (``torch.OutOfMemoryError``) or an "out of memory" RuntimeError."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()
    )


def _torch_threads() -> int | None:
    """The calling thread's torch intra-op thread count (``None`` when torch is not imported)."""
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


def _match_torch_threads(n: int | None) -> None:
    """Run the model with the callers' torch thread count.

    OpenMP keeps the thread count per OS thread, so a ``torch.set_num_threads`` made by a worker or a user
    in their own thread never reaches the dispatcher thread; without this the dispatcher kept the default
    (all cores) and, on a shared 2-core machine, CHGNet calls ran up to 28x slower than unbatched.
    """
    torch = sys.modules.get("torch")
    if n is not None and torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class _Request:
    """One ``evaluate`` call: the caller's structures, their results, and a done flag."""

    __slots__ = (
        "atoms",
        "cursor",
        "done",
        "energy_only",
        "error",
        "errors",
        "failed",
        "remaining",
        "results",
        "sizes",
        "t_start",
        "t_submit",
        "thread",
    )

    def __init__(self, atoms: Sequence[Atoms], thread: int, energy_only: bool = False) -> None:
        self.atoms = list(atoms)
        self.energy_only = energy_only
        """Energies only (`BatchingEngine.energies`): fused only with other energy-only requests."""
        self.sizes = [len(a) for a in self.atoms]
        self.results: list[Evaluation | None] = [None] * len(self.atoms)
        self.failed: set[int] = set()
        self.error: BaseException | None = None
        """The first error of this request's structures."""
        self.errors: dict[int, BaseException] = {}
        """Structure index -> the error its evaluation raised."""
        self.remaining = len(self.atoms)
        self.cursor = 0
        """Index of the first structure not yet handed to a batch."""
        self.done = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None
        self.thread = thread

    def atoms_left(self) -> int:
        return sum(self.sizes[self.cursor:])


_Item = tuple[_Request, int]


class BatchingEngine:
    """Fuses concurrent ``evaluate`` requests for one potential into batched model calls (see module doc).

    Args:
        potential: the loaded model (on its device).
        budget_atoms: most atoms per model call; default from the environment / device (module doc).
        max_wait_s: longest wait for more requests before a batch starts; ``None`` = adaptive.
    """

    def __init__(self, potential: Potential, *, budget_atoms: int | None = None,
                 max_wait_s: float | None = None) -> None:
        if budget_atoms is not None and (not isinstance(budget_atoms, int) or budget_atoms < 1):
            raise ValueError(f"budget_atoms must be a positive integer, got {budget_atoms!r}")
        if max_wait_s is not None and not (max_wait_s >= 0):
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {max_wait_s!r}")
        self.potential = potential
        self.device = potential.device
        self._budget = budget_atoms if budget_atoms is not None else default_budget(potential)
        if max_wait_s is None and os.environ.get(ENV_WAIT_MS):
            max_wait_s = float(os.environ[ENV_WAIT_MS]) / 1000.0
        self._fixed_wait = max_wait_s
        self._cond = threading.Condition()
        self._pending: deque[_Request] = deque()
        self._pending_atoms = 0
        self._active: set[int] = set()
        self._busy: dict[int, int] = {}
        """Thread ident -> number of its unfinished requests."""
        self._last_done: dict[int, float] = {}
        """Thread ident -> when its last request finished (for the think time)."""
        self._last_batch_end = 0.0
        self._closed = False
        self._lanes: list[threading.Thread] = []
        self._lane_idents: set[int] = set()
        self._running_lanes = 0
        self._caller_torch_threads: int | None = None
        self.stats = EngineStats(budget_atoms=self._budget)
        log.info("batching engine for %s on %s: budget %d atoms", potential.name, self.device, self._budget,
                 extra={"model": potential.name, "device": self.device, "budget_atoms": self._budget})

    def __repr__(self) -> str:
        return f"BatchingEngine({self.potential.name!r}, device={self.device!r}, budget_atoms={self._budget})"

    # ------------------------------------------------------------------ configuration
    @property
    def budget_atoms(self) -> int:
        """Most atoms per model call."""
        return self._budget

    @budget_atoms.setter
    def budget_atoms(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"budget_atoms must be a positive integer, got {value!r}")
        with self._cond:
            self._budget = value
            self.stats.budget_atoms = value
            self._cond.notify_all()

    @property
    def max_wait_s(self) -> float:
        """Current coalescing wait: fixed if configured, else adaptive to the mean model-call time."""
        if self._fixed_wait is not None:
            return self._fixed_wait
        return min(MAX_WAIT_S, max(MIN_WAIT_S, WAIT_THINK_FACTOR * self.stats.think_s))

    @max_wait_s.setter
    def max_wait_s(self, value: float | None) -> None:
        if value is not None and not (value >= 0):
            raise ValueError(f"max_wait_s must be >= 0 seconds, got {value!r}")
        self._fixed_wait = value

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Requests waiting for a batch (not counting the one being computed)."""
        with self._cond:
            return len(self._pending)

    def reset_stats(self) -> None:
        with self._cond:
            self.stats = EngineStats(budget_atoms=self._budget)

    def stats_snapshot(self) -> EngineStats:
        """A consistent copy of `stats`."""
        with self._cond:
            s = self.stats
            return EngineStats(**{**asdict(s), "structures_per_call": list(s.structures_per_call),
                                  "atoms_per_call": list(s.atoms_per_call),
                                  "fill_per_call": list(s.fill_per_call)})

    # ------------------------------------------------------------------ the Evaluator interface
    def evaluate(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        """Energies, forces and stresses of ``atoms_list`` (input order), computed in fused batches.

        Blocks until every structure is done; raises the (first) error of this caller's structures.
        """
        atoms_list = list(atoms_list)
        if not atoms_list:
            return []
        req = self._submit_and_wait(atoms_list)
        if req is None:
            return self.potential.evaluate(atoms_list)  # after shutdown, or re-entered by the model
        if req.error is not None:
            raise req.error
        return [r for r in req.results if r is not None]

    def evaluate_partial(self, atoms_list: Sequence[Atoms]) -> list[Evaluation | BaseException]:
        """Like `evaluate`, but a structure whose evaluation raised gets its exception in its slot
        (the others still get their results): one request for many independent calculations."""
        atoms_list = list(atoms_list)
        if not atoms_list:
            return []
        req = self._submit_and_wait(atoms_list)
        if req is None:
            out: list[Evaluation | BaseException] = []
            for atoms in atoms_list:
                try:
                    out.append(self.potential.evaluate([atoms])[0])
                except Exception as exc:  # noqa: BLE001 - goes to that structure's caller
                    out.append(exc)
            return out
        return [r if r is not None else req.errors.get(i, req.error or RuntimeError("no result"))
                for i, r in enumerate(req.results)]

    def energies(self, atoms_list: Sequence[Atoms]) -> list[float]:
        """Total energies (eV) of ``atoms_list`` (input order) without forces or stress where the model can skip
        them (``Potential.energies``), in fused batches of energy-only requests; raises like `evaluate`."""
        atoms_list = list(atoms_list)
        if not atoms_list:
            return []
        req = self._submit_and_wait(atoms_list, energy_only=True)
        if req is None:
            return self.potential.energies(atoms_list)
        if req.error is not None:
            raise req.error
        return [float(r.energy_eV) for r in req.results if r is not None]

    def _submit_and_wait(self, atoms_list: list[Atoms], energy_only: bool = False) -> _Request | None:
        """Queue one request and block until it is settled; ``None`` when the caller must evaluate directly."""
        me = threading.get_ident()
        if self._closed or me in self._lane_idents:
            return None
        req = _Request(atoms_list, me, energy_only)
        threads = _torch_threads()
        with self._cond:
            if self._closed:
                return None
            self._caller_torch_threads = threads
            self._ensure_lanes()
            self._pending.append(req)
            self._pending_atoms += sum(req.sizes)
            self._active.add(me)
            self._busy[me] = self._busy.get(me, 0) + 1
            last = self._last_done.pop(me, None)
            if last is not None:
                think = req.t_submit - last
                s = self.stats
                s.think_s = think if s.think_s == 0.0 else s.think_s + THINK_EMA_ALPHA * (think - s.think_s)
            self.stats.requests += 1
            self.stats.structures += len(atoms_list)
            self._cond.notify_all()
        while not req.done.wait(_POLL_S):
            if not any(t.is_alive() for t in self._lanes):
                raise RuntimeError("batching engine dispatcher stopped before the request finished")
        return req

    def __call__(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        return self.evaluate(atoms_list)

    # ------------------------------------------------------------------ lifecycle
    @property
    def lanes(self) -> int:
        """Dispatcher threads (model calls that may run at once); see the module doc."""
        return len(self._lanes)

    def _n_lanes(self) -> int:
        p = self.potential
        if not getattr(p, "concurrent_calls", False) or not str(self.device).startswith("cpu"):
            return 1
        env = os.environ.get(ENV_LANES)
        if env:
            return max(1, int(env))
        return max(1, min(self._caller_torch_threads or 1, os.cpu_count() or 1))

    def _ensure_lanes(self) -> None:
        """Start the dispatcher lanes (lock held); restart any that died."""
        if not self._lanes:
            self._lanes = [self._new_lane(i) for i in range(self._n_lanes())]
        for i, t in enumerate(self._lanes):
            if not t.is_alive():
                self._lane_idents.discard(t.ident or -1)
                self._lanes[i] = self._new_lane(i)

    def _new_lane(self, i: int) -> threading.Thread:
        t = threading.Thread(target=self._dispatch_loop, daemon=True,
                             name=f"matcalc-batching-{self.potential.name}-{self.device}-{i}")
        t.start()
        if t.ident is not None:
            self._lane_idents.add(t.ident)
        return t

    def shutdown(self, timeout_s: float | None = 10.0) -> None:
        """Finish pending requests, then stop the dispatcher; later calls evaluate directly (unbatched)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            lanes = list(self._lanes)
        for t in lanes:
            if t is not threading.current_thread():
                t.join(timeout_s)

    # ------------------------------------------------------------------ the dispatcher
    def _dispatch_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                self._wait_for_more()
                # another lane may have taken everything while this one waited
                batch = self._take_batch() if self._pending else []
            if not batch:
                continue
            t = time.perf_counter()
            with self._cond:
                for req in {id(r): r for r, _ in batch}.values():
                    if req.t_start is None:
                        req.t_start = t
                        self.stats.wait_s += t - req.t_submit
            try:
                self._run(batch)
            except BaseException as exc:  # never leave a caller hanging
                log.exception("batching engine: unexpected error")
                self._fail(batch, exc)
            with self._cond:
                self._last_batch_end = time.perf_counter()

    def _wait_for_more(self) -> None:
        """Hold (with the lock) until the coalescing policy says go; see the module doc."""
        wait = self.max_wait_s
        while not self._closed and self._pending:
            if self._pending_atoms >= self._budget:
                return
            if self._active.issubset(self._busy):
                return
            start = max(self._pending[0].t_submit, self._last_batch_end)
            remaining = start + wait - time.perf_counter()
            if remaining <= 0:
                gone = self._active.difference(self._busy)
                self._active.difference_update(gone)
                for ident in gone:
                    self._last_done.pop(ident, None)  # a returning caller's gap is not think time
                self.stats.dropped_callers += len(gone)
                return
            self._cond.wait(remaining)

    def _take_batch(self) -> list[_Item]:
        """First-come first-served within the budget; whole requests when they fit (module doc). A batch holds
        requests of one kind: the oldest request's (energies only, or energies with forces and stress)."""
        budget = self._budget
        items: list[_Item] = []
        total = 0
        kind = self._pending[0].energy_only
        for req in self._pending:
            if req.energy_only != kind:
                continue
            left = req.atoms_left()
            if not items:  # the oldest request always goes (split only if it exceeds the budget)
                while req.cursor < len(req.atoms) and (not items or total + req.sizes[req.cursor] <= budget):
                    items.append((req, req.cursor))
                    total += req.sizes[req.cursor]
                    req.cursor += 1
            elif total + left <= budget:
                items.extend((req, i) for i in range(req.cursor, len(req.atoms)))
                total += left
                req.cursor = len(req.atoms)
            if total >= budget:
                break
        self._pending = deque(r for r in self._pending if r.cursor < len(r.atoms))
        self._pending_atoms -= total
        return items

    def _run(self, items: list[_Item]) -> None:
        """One model call for ``items``; on OOM split in halves, on other errors retry one by one."""
        atoms = [req.atoms[i] for req, i in items]
        try:
            results = self._model_call(atoms, energy_only=items[0][0].energy_only)
        except Exception as exc:
            n_atoms = sum(len(a) for a in atoms)
            if is_out_of_memory(exc):
                self._after_oom(n_atoms, len(items))
                if len(items) > 1:
                    mid = len(items) // 2
                    self._run(items[:mid])
                    self._run(items[mid:])
                    return
            elif len(items) > 1:
                log.warning("batching engine: model error on a batch of %d structures (%s); retrying one by one",
                            len(items), exc)
                with self._cond:
                    self.stats.error_retries += 1
                for item in items:
                    self._run([item])
                return
            self._fail(items, exc)
            return
        self._deliver(items, results)

    def _model_call(self, atoms: list[Atoms], energy_only: bool = False) -> list[Evaluation]:
        p = self.potential
        with self._cond:
            self._running_lanes += 1
            threads = self._caller_torch_threads
            if threads is not None and len(self._lanes) > 1:  # share the callers' cores among busy lanes
                threads = max(1, threads // self._running_lanes)
        _match_torch_threads(threads)
        t0 = time.perf_counter()
        n_atoms = sum(len(a) for a in atoms)
        try:
            if energy_only:  # energies in Evaluations without forces (only energies() reads them)
                values = p._energies_batch(atoms) if p.supports_batching else p.energies(atoms)
                results = [Evaluation(float(v), _NO_FORCES) for v in values]
            elif p.supports_batching:
                # the engine owns chunking (its budget), so call the model on the whole batch at once
                results = p._evaluate_batch(atoms)
            else:
                results = p.evaluate(atoms)  # one structure per model call anyway
        finally:
            dt = time.perf_counter() - t0
            with self._cond:
                self._running_lanes -= 1
                s = self.stats
                s.calls += 1
                s.structures_per_call.append(len(atoms))
                s.atoms_per_call.append(n_atoms)
                s.fill_per_call.append(n_atoms / self._budget)
                s.model_time_s += dt
        if len(results) != len(atoms):
            raise RuntimeError(f"{p.name}: model returned {len(results)} results for {len(atoms)} structures")
        if p.supports_batching:
            with p._stats_lock:  # same bookkeeping as Potential.evaluate
                p.stats.calls += 1
                p.stats.structures += len(atoms)
                p.stats.atoms += n_atoms
                p.stats.model_time_s += dt
                p.stats.batch_sizes.append(len(atoms))
        return results

    def _after_oom(self, n_atoms: int, n_structures: int) -> None:
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass
        with self._cond:
            self.stats.oom_splits += n_structures > 1
            new = max(1, min(self._budget, n_atoms // 2))
            if new < self._budget:
                self._budget = new
                self.stats.budget_atoms = new
        log.warning("batching engine: out of memory at %d atoms (%d structures); budget now %d atoms",
                    n_atoms, n_structures, self._budget,
                    extra={"model": self.potential.name, "device": self.device, "budget_atoms": self._budget})

    def _deliver(self, items: list[_Item], results: list[Evaluation]) -> None:
        finished = []
        with self._cond:
            for (req, i), res in zip(items, results, strict=True):
                req.results[i] = res
                req.remaining -= 1
                if req.remaining == 0:
                    finished.append(req)
            self._finish(finished)

    def _fail(self, items: list[_Item], exc: BaseException) -> None:
        finished = []
        with self._cond:
            for req, i in items:
                if req.done.is_set() or req.results[i] is not None or i in req.failed:
                    continue  # already settled (only after an unexpected dispatcher error)
                req.failed.add(i)
                req.errors[i] = exc
                self.stats.failed_structures += 1
                if req.error is None:
                    req.error = exc
                req.remaining -= 1
                if req.remaining == 0:
                    finished.append(req)
            self._finish(finished)

    def _finish(self, finished: list[_Request]) -> None:
        """Mark requests done (lock held): the caller is no longer busy but stays active."""
        now = time.perf_counter()
        for req in finished:
            n = self._busy.get(req.thread, 0) - 1
            if n > 0:
                self._busy[req.thread] = n
            else:
                self._busy.pop(req.thread, None)
                self._last_done[req.thread] = now
            req.done.set()


# ---------------------------------------------------------------------- process-wide registry
_ENGINES: dict[tuple[int, str], BatchingEngine] = {}
_LOCK = threading.Lock()
_SWITCH = Switch(ENV_ENABLED)
enabled = _SWITCH.enabled
"""Whether calculations go through the engine: `set_enabled`, else ``MATCALC_BATCHING`` (default on)."""
set_enabled = _SWITCH.set_enabled
"""Turn batching on/off for this process (``None``: back to the ``MATCALC_BATCHING`` variable)."""
disabled = _SWITCH.disabled
"""``with batching.disabled(): ...`` runs calculations unbatched (process-wide, for A/B runs)."""


def default_budget(potential: Potential) -> int:
    """The atom budget for ``potential``: ``MATCALC_BATCH_ATOMS``, else from free GPU memory, else CPU default."""
    env = os.environ.get(ENV_BUDGET_ATOMS)
    if env:
        value = int(env)
        if value < 1:
            raise ValueError(f"{ENV_BUDGET_ATOMS} must be a positive integer, got {env!r}")
        return value
    device = str(potential.device)
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                free, _total = torch.cuda.mem_get_info(torch.device(device))
                per_gb = float(os.environ.get(ENV_ATOMS_PER_GB) or ATOMS_PER_GB)
                atoms = int(free / 2**30 * GPU_MEMORY_FRACTION * per_gb)
                return min(max(MIN_BUDGET_ATOMS, min(MAX_BUDGET_ATOMS, atoms)), _model_cap(potential))
        except (ImportError, RuntimeError) as exc:  # pragma: no cover - no usable GPU
            log.warning("cannot read free memory of %s (%s); using the CPU budget", device, exc)
    return min(CPU_BUDGET_ATOMS, _model_cap(potential))


def _model_cap(potential: Potential) -> int:
    cap = getattr(potential, "max_batch_atoms", None)
    return int(cap) if isinstance(cap, int) and cap > 0 else MAX_BUDGET_ATOMS


def engine_for(potential: Potential, *, budget_atoms: int | None = None,
               max_wait_s: float | None = None) -> BatchingEngine:
    """The process-wide engine of ``potential`` (created on first use; options apply at creation only)."""
    key = (id(potential), str(potential.device))
    engine = _ENGINES.get(key)
    if engine is not None and engine.potential is potential and not engine.closed:
        return engine
    with _LOCK:
        engine = _ENGINES.get(key)
        if engine is None or engine.potential is not potential or engine.closed:
            engine = BatchingEngine(potential, budget_atoms=budget_atoms, max_wait_s=max_wait_s)
            _ENGINES[key] = engine
        return engine


def engines() -> list[BatchingEngine]:
    """Every live engine of this process."""
    with _LOCK:
        return [e for e in _ENGINES.values() if not e.closed]


def shutdown(potential: Potential | None = None) -> None:
    """Stop the engine of ``potential`` (or all engines); the next request creates a fresh one."""
    with _LOCK:
        keys = [k for k, e in _ENGINES.items() if potential is None or e.potential is potential]
        stopping = [_ENGINES.pop(k) for k in keys]
    for e in stopping:
        e.shutdown()


def _after_fork() -> None:  # threads do not survive fork: forget engines inherited from the parent
    global _LOCK
    _LOCK = threading.Lock()
    _ENGINES.clear()


atexit.register(shutdown)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)

__all__ = [
    "ATOMS_PER_GB",
    "CPU_BUDGET_ATOMS",
    "BatchingEngine",
    "EngineStats",
    "default_budget",
    "disabled",
    "enabled",
    "engine_for",
    "engines",
    "is_out_of_memory",
    "set_enabled",
    "shutdown",
]
