"""Many structures at once, in-process: `relax_many` and `map_property` for any property.

Each structure's calculation runs in its own thread. Their optimisations (and MD runs) join one batched
stepper per model and algorithm (`matcalc.batched`): all structures advance with one vectorised step and
one model request per step, so the threads mostly wait and their per-structure Python work does not
serialise on the GIL. The model's batching engine (`matcalc.batching`) fuses the requests into model
calls within its atom budget. Results come back in input order; a structure that fails yields its exception
object in its slot instead of sinking the rest.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import os
import statistics
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from ase import Atoms

from matcalc import batched, batching
from matcalc.calculations import property_function
from matcalc.calculations.common import label_of
from matcalc.calculations.relax import RelaxResult
from matcalc.calculations.results import Result, results_frame
from matcalc.models import Potential, get_model

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MAX_WORKERS = 32
"""Upper bound of the default thread count without batched stepping (more threads add GIL contention, not
larger batches)."""
BATCHED_MIN_WORKERS = 16
BATCHED_MAX_WORKERS = 128
"""Bounds of the default thread count with batched stepping: the threads of concurrent calculations wait
while one of them steps all their structures, so more threads mean a larger vectorised step (host work
amortised over more structures) and fuller model requests; the cap bounds memory and start-up contention."""
ASSUMED_ATOMS = 100
"""Size assumed for inputs whose atom count is unknown before reading them (paths, CIF text, names)."""


def default_workers(potential: Potential, structures: list[Any]) -> int:
    """Threads for ``len(structures)`` concurrent calculations with ``potential``: never more than the
    structures, otherwise `recommended_concurrency` for their median size."""
    n = len(structures)
    if n == 0:
        return 1
    median = max(1, int(statistics.median(_size(s) for s in structures)))
    return max(1, min(n, recommended_concurrency(potential, median)))


def recommended_concurrency(potential: Potential, atoms_per_structure: int = ASSUMED_ATOMS) -> int:
    """How many calculations one process should run at once with ``potential`` (the number the engine wants).

    With batched stepping (`matcalc.batched.enabled`, the default): enough concurrent structures to
    fill one model call of the batching engine (``budget_atoms // atoms_per_structure``), at least
    `BATCHED_MIN_WORKERS` and at most `BATCHED_MAX_WORKERS` (the threads wait while one of them
    steps all their structures, so more of them cost little). Without it: with batching (enabled and a
    batching model) ``budget_atoms // atoms_per_structure`` clamped to ``[2, MAX_WORKERS]`` (more threads only
    add GIL contention), else 1 (the model serialises calls anyway). Used by `map_property`; the server's
    in-process executor and ``matcalc.cluster`` workers size their task concurrency with it too.
    """
    fused = batching.enabled() and potential.supports_batching
    per_call = batching.engine_for(potential).budget_atoms // max(1, atoms_per_structure) if fused else 0
    if batched.enabled():
        return min(BATCHED_MAX_WORKERS, max(BATCHED_MIN_WORKERS, per_call))
    if not fused:
        return 1
    return max(2, min(MAX_WORKERS, per_call))


def _size(structure: Any) -> int:
    if isinstance(structure, Atoms):
        return len(structure)
    try:
        from pymatgen.core import Structure

        if isinstance(structure, Structure):
            return len(structure)
    except ImportError:  # pragma: no cover
        pass
    return ASSUMED_ATOMS


def map_property(
    prop: str | Callable[..., Any],
    structures: Iterable[Any],
    model: str | Potential = "chgnet",
    *,
    max_workers: int | None = None,
    progress: bool = True,
    device: str | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Compute ``prop`` for every structure concurrently; results (or exceptions) in input order.

    Args:
        prop: a property name (``"relax"``, ``"bulk_modulus"``, ``"heat_capacity"``, ``"single_point"``...)
            or any callable ``fn(structure, model=potential, **kwargs)``.
        structures: anything `matcalc.load_structure` reads, one per item (a list, not one path).
        model: model name or loaded Potential; loaded once and shared by all threads.
        max_workers: threads; default `default_workers` (fills the batching engine's atom budget).
        progress: show a tqdm progress bar (``tqdm.auto``: a widget in notebooks).
        device: ``"cpu"``, ``"cuda"``...; default a GPU if torch sees one.
        **kwargs: passed to the property function (e.g. ``protocol="fast"``, ``fmax=0.01``).

    Returns:
        One entry per structure: the result, or the exception its calculation raised.

    Raises:
        ValueError: bad ``prop``, ``structures``, ``max_workers`` or ``progress``.
        TypeError: a keyword the property function does not take.
        UnknownModelError, ModelUnavailableError: the model cannot be loaded (affects every structure).
    """
    fn, name = _resolve(prop)
    if isinstance(structures, (str, bytes, os.PathLike, Atoms)):
        raise ValueError("structures must be a list (or other iterable) of structures, not a single structure")
    try:
        items = list(structures)
    except TypeError as exc:
        raise ValueError(f"structures must be an iterable of structures, got {type(structures).__name__}") from exc
    if max_workers is not None and (isinstance(max_workers, bool) or not isinstance(max_workers, int)
                                    or max_workers < 1):
        raise ValueError(f"max_workers must be a positive integer, got {max_workers!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress must be True or False, got {progress!r}")
    _check_kwargs(fn, name, kwargs)
    if not items:
        return []
    potential = get_model(model, device)
    workers = max_workers or default_workers(potential, items)
    log.info("%s of %d structures with %s: %d threads, batching %s", name, len(items), potential.name, workers,
             "on" if batching.enabled() else "off",
             extra={"property": name, "n_structures": len(items), "workers": workers, "model": potential.name})

    def one(structure: Any) -> Any:
        return fn(structure, model=potential, **kwargs)

    from tqdm.auto import tqdm

    out: list[Any] = [None] * len(items)
    bar = tqdm(total=len(items), desc=f"{name} ({potential.name})", unit="structure", disable=not progress)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"matcalc-{name}")
    try:
        index: dict[Future[Any], int] = {}
        for i, s in enumerate(items):
            index[pool.submit(contextvars.copy_context().run, one, s)] = i
        todo = set(index)
        while todo:
            done, todo = wait(todo, return_when=FIRST_COMPLETED)
            for fut in done:
                i = index[fut]
                exc = fut.exception()
                if exc is None:
                    out[i] = fut.result()
                else:
                    log.warning("%s of structure %d (%s) failed: %s: %s", name, i, label_of(items[i]) or "-",
                                type(exc).__name__, exc, extra={"property": name, "index": i})
                    out[i] = exc
                bar.update(1)
            if batching.enabled():
                stats = batching.engine_for(potential).stats
                bar.set_postfix(batch=f"{stats.mean_batch_size:.1f}", refresh=False)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return out


def relax_many(
    structures: Iterable[Any],
    model: str | Potential = "chgnet",
    *,
    max_workers: int | None = None,
    progress: bool = True,
    device: str | None = None,
    **relax_kwargs: Any,
) -> list[RelaxResult | Exception]:
    """`matcalc.relax` on every structure concurrently (batched); results or exceptions in input order.

    ``relax_kwargs`` are `matcalc.relax` keywords (``protocol="fast"``, ``fmax``, ``optimizer``...).
    """
    return map_property("relax", structures, model, max_workers=max_workers, progress=progress, device=device,
                        **relax_kwargs)


def many_frame(results: Iterable[Result | BaseException | None], inputs: Iterable[Any] | None = None
               ) -> pd.DataFrame:
    """A pandas DataFrame with one row per input: ``index``, ``input`` (label), ``ok``, the result's
    scalar fields, and ``error`` for failed entries."""
    results = list(results)
    frame = results_frame(results)
    frame.insert(0, "index", range(len(results)))
    if inputs is not None:
        labels = [label_of(x) for x in inputs]
        if len(labels) != len(results):
            raise ValueError(f"inputs has {len(labels)} entries but results has {len(results)}")
        frame.insert(1, "input", labels)
    frame.insert(2 if inputs is not None else 1, "ok", [isinstance(r, Result) for r in results])
    if "error" not in frame.columns:
        frame["error"] = None
    return frame


def _resolve(prop: str | Callable[..., Any]) -> tuple[Callable[..., Any], str]:
    if isinstance(prop, str):
        fn = property_function(prop)  # ValueError naming the known properties
        return fn, fn.__name__
    if callable(prop):
        return prop, getattr(prop, "__name__", type(prop).__name__)
    raise ValueError(f"prop must be a property name or a callable, got {type(prop).__name__}")


def _check_kwargs(fn: Callable[..., Any], name: str, kwargs: dict[str, Any]) -> None:
    """Fail once, up front, on a keyword ``fn`` does not take (instead of once per structure)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    try:
        sig.bind(None, model=None, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}: {exc}") from exc
    spec = getattr(fn, "property", None)  # a declared property: its output files are one per call
    if spec is not None:
        from matcalc.calculations.contract import FilePath

        for key in kwargs:
            if kwargs[key] is not None and any(p.name == key and isinstance(p.kind, FilePath) for p in spec.params):
                raise ValueError(f"{name}: {key} is one file per structure; call {name}(..., {key}=...) for each "
                                 "structure instead")


__all__ = ["BATCHED_MAX_WORKERS", "BATCHED_MIN_WORKERS", "default_workers", "many_frame", "map_property",
           "recommended_concurrency", "relax_many"]
