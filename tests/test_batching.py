"""The batching engine: fusion, parity with unbatched evaluation, budget, OOM split, error isolation."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.filters import FrechetCellFilter
from ase.optimize import FIRE

from matcalc import batching
from matcalc.batching import BatchingEngine, engine_for, is_out_of_memory
from matcalc.calculations.common import evaluator_for
from matcalc.models import Evaluation, Potential, get_model


class BatchEMT(Potential):
    """A *batching* test potential: EMT per structure, but one ``_evaluate_batch`` per fused call.

    Records every batch it sees; can raise out-of-memory above ``oom_above`` atoms, a ValueError on
    structures tagged ``info["poison"]``, and block on ``gate`` (to queue requests deterministically).
    """

    supports_batching = True

    def __init__(self, oom_above: int | None = None, oom_exc: type[BaseException] = RuntimeError) -> None:
        super().__init__("batch-emt", device="cpu")
        self.oom_above = oom_above
        self.oom_exc = oom_exc
        self.seen: list[list[int]] = []
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        sizes = [len(a) for a in atoms_list]
        with self._lock:
            self.seen.append(sizes)
        if self.oom_above is not None and sum(sizes) > self.oom_above:
            raise self.oom_exc(f"CUDA out of memory. Tried to allocate for {sum(sizes)} atoms")
        if any(a.info.get("poison") for a in atoms_list):
            raise ValueError("poisoned structure")
        return [emt_eval(a) for a in atoms_list]


def emt_eval(atoms: Atoms) -> Evaluation:
    """Plain ASE EMT: the independent reference."""
    a = atoms.copy()
    a.calc = EMT()
    return Evaluation(a.get_potential_energy(), a.get_forces(), a.get_stress(voigt=True))


def cu_cell(reps: tuple[int, int, int], seed: int) -> Atoms:
    a = bulk("Cu", "fcc", a=3.6, cubic=True) * reps
    a.rattle(0.05, seed=seed)
    return a


SIZES = [(1, 1, 1), (2, 1, 1), (2, 2, 1), (1, 1, 2), (2, 2, 2), (1, 2, 1)]  # 4..32 atoms


@pytest.fixture
def engine_factory():
    made: list[BatchingEngine] = []

    def make(potential: Potential, **kw) -> BatchingEngine:
        e = BatchingEngine(potential, **kw)
        made.append(e)
        return e

    yield make
    for e in made:
        e.shutdown()


def run_threads(fn, args) -> list:
    out: list = [None] * len(args)
    errors: list = [None] * len(args)

    def target(i: int) -> None:
        try:
            out[i] = fn(args[i])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors[i] = exc

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return [errors[i] if errors[i] is not None else out[i] for i in range(len(args))]


def assert_same(ev: Evaluation, ref: Evaluation, tol: float = 1e-10) -> None:
    assert abs(ev.energy_eV - ref.energy_eV) <= tol
    np.testing.assert_allclose(ev.forces_eV_per_A, ref.forces_eV_per_A, atol=tol)
    np.testing.assert_allclose(ev.stress_eV_per_A3, ref.stress_eV_per_A3, atol=tol)


def test_engine_results_equal_direct_evaluation(engine_factory):
    engine = engine_factory(BatchEMT(), budget_atoms=1024)
    cells = [cu_cell(r, i) for i, r in enumerate(SIZES)]
    for ev, a in zip(engine.evaluate(cells), cells, strict=True):
        assert_same(ev, emt_eval(a))
    assert engine.evaluate([]) == []
    s = engine.stats
    assert s.requests == 1 and s.structures == len(cells) and s.calls == 1
    assert s.structures_per_call == [len(cells)]


def test_concurrent_relaxations_fuse_and_match_serial(engine_factory):
    pot = BatchEMT()
    engine = engine_factory(pot, budget_atoms=1024, max_wait_s=0.5)  # generous: this shared CI CPU is slow and noisy
    starts = [cu_cell(SIZES[i % 3], seed=10 + i) for i in range(8)]

    def relax(atoms: Atoms, calc) -> float:
        atoms = atoms.copy()
        atoms.calc = calc
        FIRE(FrechetCellFilter(atoms), logfile=None).run(fmax=0.05, steps=15)
        return atoms.get_potential_energy()

    fused = run_threads(lambda a: relax(a, pot.calculator(engine)), starts)
    serial = [relax(a, EMT()) for a in starts]
    np.testing.assert_allclose(fused, serial, atol=1e-8)
    s = engine.stats
    assert s.mean_batch_size > 1.0, s.summary()
    assert s.calls < s.requests, s.summary()
    assert sum(s.structures_per_call) == s.structures
    assert pot.stats.calls == s.calls  # the potential saw exactly the fused calls


def test_batches_never_exceed_budget(engine_factory):
    pot = BatchEMT()
    engine = engine_factory(pot, budget_atoms=40, max_wait_s=0.01)
    lists = [[cu_cell(SIZES[(i + k) % len(SIZES)], seed=100 * i + k) for k in range(i % 3 + 1)] for i in range(8)]
    lists.append([cu_cell((2, 2, 2), seed=999 + k) for k in range(4)])  # 128 atoms: must be split
    results = run_threads(engine.evaluate, lists)
    for res, cells in zip(results, lists, strict=True):
        assert not isinstance(res, Exception), res
        for ev, a in zip(res, cells, strict=True):
            assert_same(ev, emt_eval(a))
    assert max(sum(b) for b in pot.seen) <= 40
    assert engine.stats.max_atoms_per_call <= 40
    assert all(0 < f <= 1.0 for f in engine.stats.fill_per_call)


def test_structure_larger_than_budget_runs_alone(engine_factory):
    pot = BatchEMT()
    engine = engine_factory(pot, budget_atoms=10)
    big, small = cu_cell((2, 2, 2), 1), cu_cell((1, 1, 1), 2)
    res = engine.evaluate([small, big, small])
    assert_same(res[1], emt_eval(big))
    assert sorted(map(tuple, pot.seen)) == [(4,), (4,), (32,)]


@pytest.mark.parametrize("exc_type", [RuntimeError, torch.cuda.OutOfMemoryError])
def test_out_of_memory_splits_batch_and_lowers_budget(engine_factory, exc_type):
    pot = BatchEMT(oom_above=50, oom_exc=exc_type)
    engine = engine_factory(pot, budget_atoms=1000)
    cells = [cu_cell((2, 2, 1), seed=i) for i in range(8)]  # 8 x 16 = 128 atoms
    res = engine.evaluate(cells)
    for ev, a in zip(res, cells, strict=True):
        assert_same(ev, emt_eval(a))
    assert engine.stats.oom_splits >= 2
    assert engine.budget_atoms <= 64
    assert engine.stats.failed_structures == 0
    # later batches respect the lowered budget: no further OOM
    before = engine.stats.oom_splits
    engine.evaluate(cells)
    assert engine.stats.oom_splits == before


def test_out_of_memory_on_one_structure_fails_only_its_caller(engine_factory):
    pot = BatchEMT(oom_above=40)
    engine = engine_factory(pot, budget_atoms=1000)
    pot.gate = threading.Event()
    warm = threading.Thread(target=engine.evaluate, args=([cu_cell((1, 1, 1), 0)],))
    warm.start()
    assert pot.entered.wait(30)  # the warm-up call is inside the model, blocked on the gate
    lists = [[cu_cell((3, 2, 2), 1)]] + [[cu_cell((1, 1, 1), 3 + i)] for i in range(3)]
    box: list = []
    runner = threading.Thread(target=lambda: box.append(run_threads(engine.evaluate, lists)))
    runner.start()
    _wait_until(lambda: engine.pending == len(lists))
    pot.gate.set()
    runner.join(60)
    warm.join(60)
    results = box[0]
    assert is_out_of_memory(results[0])
    for res, cells in zip(results[1:], lists[1:], strict=True):
        assert_same(res[0], emt_eval(cells[0]))


def test_model_error_goes_only_to_its_caller(engine_factory):
    pot = BatchEMT()
    engine = engine_factory(pot, budget_atoms=1024, max_wait_s=0.2)
    pot.gate = threading.Event()
    warm = threading.Thread(target=engine.evaluate, args=([cu_cell((1, 1, 1), 0)],))
    warm.start()
    assert pot.entered.wait(30)  # the warm-up call is inside the model, blocked on the gate
    bad = cu_cell((1, 1, 1), 1)
    bad.info["poison"] = True
    lists = [[cu_cell((2, 1, 1), 2)], [bad], [cu_cell((1, 1, 2), 3)], [cu_cell((2, 2, 1), 4)]]
    box: list = []
    runner = threading.Thread(target=lambda: box.append(run_threads(engine.evaluate, lists)))
    runner.start()
    _wait_until(lambda: engine.pending == len(lists))  # all four queued behind the blocked call
    pot.gate.set()
    runner.join(60)
    warm.join(60)
    results = box[0]
    assert isinstance(results[1], ValueError) and "poisoned" in str(results[1])
    for i in (0, 2, 3):
        assert_same(results[i][0], emt_eval(lists[i][0]))
    s = engine.stats
    assert 4 in s.structures_per_call  # the four were fused into one call ...
    assert s.error_retries == 1 and s.failed_structures == 1  # ... which was retried one by one


def test_non_batching_potential_is_correct_through_engine(engine_factory):
    pot = get_model("emt", "cpu")
    assert not pot.supports_batching
    engine = engine_factory(pot)
    cells = [[cu_cell(SIZES[i % len(SIZES)], seed=i)] for i in range(6)]
    results = run_threads(engine.evaluate, cells)
    for res, c in zip(results, cells, strict=True):
        assert_same(res[0], emt_eval(c[0]))


class SlowConcurrent(Potential):
    """EMT that sleeps in each call (releasing the GIL like a torch op) and records when calls overlap and
    how many torch threads each call was given."""

    supports_batching = True

    def __init__(self, concurrent: bool) -> None:
        super().__init__("slow-emt", device="cpu")
        self.concurrent_calls = concurrent
        self.running = 0
        self.max_running = 0
        self.threads_seen: list[int] = []
        self._lock = threading.Lock()

    def _evaluate_batch(self, atoms_list: Sequence[Atoms]) -> list[Evaluation]:
        with self._lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.threads_seen.append(torch.get_num_threads())
        try:
            import time

            time.sleep(0.05)
            return [emt_eval(a) for a in atoms_list]
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("concurrent", [True, False])
def test_cpu_lanes_run_calls_side_by_side(engine_factory, concurrent):
    """A potential that allows concurrent calls gets one lane per caller torch thread (2 here): two callers'
    calls overlap, each with 1 torch thread, while a lone call keeps both threads; results stay exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pot = SlowConcurrent(concurrent)
        engine = engine_factory(pot, budget_atoms=4)  # one 4-atom cell per call: no fusion
        alone = cu_cell((1, 1, 1), 1)
        assert_same(engine.evaluate([alone])[0], emt_eval(alone))
        assert engine.lanes == (2 if concurrent else 1)
        assert pot.threads_seen == [2]  # alone: every core for the one call

        def relax_like(seed: int) -> list[Evaluation]:
            torch.set_num_threads(2)  # per OS thread, as a worker or a user sets it
            return [engine.evaluate([cu_cell((1, 1, 1), seed * 10 + k)])[0] for k in range(6)]

        seeds = [1, 2, 3, 4]  # more callers than lanes: lanes compete for the queue
        got = run_threads(relax_like, seeds)
        for seed, evs in zip(seeds, got, strict=True):
            assert not isinstance(evs, Exception), evs
            for k, ev in enumerate(evs):
                assert_same(ev, emt_eval(cu_cell((1, 1, 1), seed * 10 + k)))
        assert pot.max_running == (2 if concurrent else 1)
        assert all(t.is_alive() for t in engine._lanes)  # no lane died on an empty queue
        if concurrent:
            assert 1 in pot.threads_seen  # side by side: one core each
    finally:
        torch.set_num_threads(before)


def test_engine_registry_is_process_wide_and_thread_safe():
    pot = BatchEMT()
    try:
        got = run_threads(lambda _: engine_for(pot), list(range(16)))
        assert all(e is got[0] for e in got)
        assert engine_for(BatchEMT()) is not got[0]
        assert got[0] in batching.engines()
        batching.shutdown(pot)
        assert got[0].closed and got[0] not in batching.engines()
        a = cu_cell((1, 1, 1), 5)
        assert_same(got[0].evaluate([a])[0], emt_eval(a))  # after shutdown: evaluated directly
        fresh = engine_for(pot)
        assert fresh is not got[0] and not fresh.closed
        assert fresh.lanes == 0  # dispatcher lanes start lazily
        fresh.evaluate([a])
        assert fresh.lanes == 1 and all(t.daemon for t in fresh._lanes)
    finally:
        batching.shutdown()


def test_enable_switches(monkeypatch):
    pot = BatchEMT()
    try:
        monkeypatch.setenv("MATCALC_BATCHING", "0")
        assert not batching.enabled() and evaluator_for(pot) is pot
        monkeypatch.setenv("MATCALC_BATCHING", "1")
        assert isinstance(evaluator_for(pot), BatchingEngine)
        with batching.disabled():
            assert evaluator_for(pot) is pot
        assert batching.enabled()
        batching.set_enabled(False)
        assert evaluator_for(pot) is pot
    finally:
        batching.set_enabled(None)
        batching.shutdown()


def test_budget_defaults(monkeypatch):
    pot = BatchEMT()
    monkeypatch.delenv("MATCALC_BATCH_ATOMS", raising=False)
    assert batching.default_budget(pot) == batching.CPU_BUDGET_ATOMS
    monkeypatch.setenv("MATCALC_BATCH_ATOMS", "300")
    assert batching.default_budget(pot) == 300
    monkeypatch.setenv("MATCALC_BATCH_ATOMS", "0")
    with pytest.raises(ValueError, match="MATCALC_BATCH_ATOMS"):
        batching.default_budget(pot)
    monkeypatch.delenv("MATCALC_BATCH_ATOMS")
    # on CUDA: free memory x fraction x atoms-per-GB
    gpu = BatchEMT()
    gpu.device = "cuda:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    assert batching.default_budget(gpu) == int(8 * batching.GPU_MEMORY_FRACTION * batching.ATOMS_PER_GB)
    monkeypatch.setenv("MATCALC_ATOMS_PER_GB", "500")
    assert batching.default_budget(gpu) == int(8 * batching.GPU_MEMORY_FRACTION * 500)
    gpu.max_batch_atoms = 1000  # the adapter's own limit caps the derived budget
    assert batching.default_budget(gpu) == 1000
    pot.max_batch_atoms = 10
    assert batching.default_budget(pot) == 10


def test_bad_arguments():
    pot = BatchEMT()
    with pytest.raises(ValueError, match="budget_atoms"):
        BatchingEngine(pot, budget_atoms=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        BatchingEngine(pot, max_wait_s=-1.0)
    e = BatchingEngine(pot)
    with pytest.raises(ValueError, match="budget_atoms"):
        e.budget_atoms = -5
    e.shutdown()


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


@pytest.mark.slow  # 19-72 s measured on the shared 2-core machine (model load included)
def test_chgnet_batched_equals_unbatched():
    """CHGNet float32: fused batches of mixed sizes vs chgnet's own ASE calculator, one structure at a time."""
    from chgnet.model.dynamics import CHGNetCalculator

    import matcalc

    pot = get_model("chgnet", "cpu")
    names = ["RSM0009", "RSM0010", "RSM0011", "RSM0012", "RSM0020"]
    cells = [matcalc.load_structure(n) for n in names]
    for i, n in enumerate(names[:3]):
        a = matcalc.load_structure(n)
        a.rattle(0.05, seed=i)
        cells.append(a)
    engine = BatchingEngine(pot, budget_atoms=10_000)
    try:
        fused = engine.evaluate(cells)  # one request: one fused model call of 8 structures
        assert engine.stats.structures_per_call == [len(cells)]
        calc = CHGNetCalculator(model=pot.model, use_device="cpu")
        for ev, a in zip(fused, cells, strict=True):
            ref = a.copy()
            ref.calc = calc
            e_ref = ref.get_potential_energy()
            assert abs(ev.energy_eV - e_ref) / len(a) <= 1e-5
            assert np.abs(ev.forces_eV_per_A - ref.get_forces()).max() <= 1e-4
            np.testing.assert_allclose(ev.stress_eV_per_A3, ref.get_stress(voigt=True), atol=1e-5)
    finally:
        engine.shutdown()


def _wait_until(cond, timeout_s: float = 30.0) -> None:
    import time

    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def test_finished_caller_is_dropped_once(engine_factory):
    """Coalescing policy: a caller that does not come back costs one wait, then it is no longer awaited."""
    engine = engine_factory(BatchEMT(), budget_atoms=1024, max_wait_s=0.05)
    a = cu_cell((1, 1, 1), 1)
    t = threading.Thread(target=engine.evaluate, args=([a],))
    t.start()
    t.join(30)  # caller A: one request, then gone (but still registered as active)
    engine.evaluate([a])  # caller B (this thread): waits once for A, drops it
    assert engine.stats.dropped_callers == 1
    engine.evaluate([a])  # B again: the only active caller, dispatched without waiting for A
    assert engine.stats.dropped_callers == 1
    assert engine.stats.calls == 3 and engine.stats.think_s > 0


def test_model_runs_with_the_callers_torch_thread_count(engine_factory):
    """OpenMP thread counts are per OS thread: the dispatcher must adopt the callers' setting."""
    seen: list[int] = []

    class SpyEMT(BatchEMT):
        def _evaluate_batch(self, atoms_list):
            seen.append(torch.get_num_threads())
            return super()._evaluate_batch(atoms_list)

    engine = engine_factory(SpyEMT(), budget_atoms=1024)
    before = torch.get_num_threads()

    def caller(n: int) -> None:
        torch.set_num_threads(n)
        engine.evaluate([cu_cell(1, n)])

    try:
        for n in (1, 2, 1):
            t = threading.Thread(target=caller, args=(n,))
            t.start()
            t.join(60)
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 2, 1]
