"""Scripted batch runs (``matcalc run``): every structure of some files/folders through one property,
in-process or on a dask cluster, results written as they finish, resumable.

Files written for ``--out results.parquet``:

* ``results.parquet.journal.jsonl`` — one JSON line per finished structure, appended and fsynced
  as soon as it finishes (the source of truth; a torn last line from a crash is ignored);
* ``results.parquet`` (or ``.csv``) — the table, one row per structure, rewritten atomically
  (temporary file + ``os.replace``) at most every ``flush_s`` seconds and at the end;
* ``results_structures/<label>.cif`` — the final structure of each finished structure whose result has one
  (``RelaxResult.final_structure``, the pre-relaxed ``relaxed_structure`` of the other properties...;
  `write_structure`), in the format ``structures`` names
  (``.xyz`` for a structure without a periodic cell); the row's ``structure_file`` says which.

One table is one calculation (property, model, protocol, parameters): an ``--out`` that holds another
calculation's rows is refused (`check_same_calculation`) rather than replaced.

Resume: a structure whose key (sha256 of structure hash + property + model + protocol +
parameters) has a COMPLETED line in the journal (or a COMPLETED row in an existing table
without journal) is not computed again; failed ones are retried. Identical structures under
two names are computed once (one row).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matcalc.calculations.contract import Choice, Either, Flag, Molecule, Number

log = logging.getLogger(__name__)

STRUCTURE_SUFFIXES = {".cif", ".vasp", ".poscar", ".xyz", ".extxyz"}
VASP_PREFIXES = ("POSCAR", "CONTCAR")


@dataclass
class Item:
    """One input structure of a batch."""

    source: str
    label: str
    atoms: Any = None
    structure_hash: str | None = None
    key: str = ""
    error: str | None = None
    structure_path: Path | None = None
    """Where its final structure is written (without suffix; ``None``: not written)."""


STRUCTURE_FORMATS = {"cif": ".cif", "extxyz": ".extxyz", "vasp": ".vasp", "none": ""}
"""``matcalc run --structures``: the format of the final structures written next to the table."""


@dataclass
class BatchSummary:
    """What `run_batch` did."""

    out: Path
    journal: Path
    n_inputs: int
    n_unique: int
    n_skipped: int
    """Already finished in an earlier run (not recomputed)."""
    n_computed: int
    n_failed: int
    wall_time_s: float
    errors: list[str] = field(default_factory=list)


def expand_inputs(inputs: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(source, label)`` for each file, each structure file under each folder (recursively,
    sorted), and each builtin structure name."""
    from matcalc.structures import list_builtins

    builtins = {b.lower(): b for b in list_builtins()}
    out: list[tuple[str, str]] = []
    for x in inputs:
        p = Path(x)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and _is_structure_file(f))
            if not files:
                log.warning("no structure files (%s) under %s", ", ".join(sorted(STRUCTURE_SUFFIXES)), p)
            out.extend((str(f), f.stem) for f in files)
        elif p.is_file():
            out.append((str(p), p.stem))
        elif str(x).lower() in builtins:
            out.append((builtins[str(x).lower()], builtins[str(x).lower()]))
        else:
            raise FileNotFoundError(f"no such file, folder or builtin structure: {x}")
    return out


def _is_structure_file(p: Path) -> bool:
    return p.suffix.lower() in STRUCTURE_SUFFIXES or p.name.upper().startswith(VASP_PREFIXES)


def task_key(structure_hash: str, prop: str, model: str, protocol: str, params: dict[str, Any]) -> str:
    """The resume key of one calculation."""
    blob = json.dumps({"structure": structure_hash, "property": prop, "model": model.lower(), "protocol": protocol,
                       "params": params}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Journal:
    """Append-only JSON-lines record of finished structures (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def read(self) -> dict[str, dict[str, Any]]:
        """key -> latest row (a torn or corrupt line is skipped with a warning)."""
        rows: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return rows
        with self.path.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError, TypeError):
                    log.warning("%s line %d is incomplete or corrupt; ignored", self.path, i)
        return rows

    def append(self, row: dict[str, Any]) -> None:
        line = json.dumps(row, default=str, allow_nan=False) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())


def write_table(rows: Iterable[dict[str, Any]], out: Path) -> None:
    """Write ``rows`` (without the ``result`` payload) to ``out`` (.parquet or .csv) atomically."""
    import pandas as pd

    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "result"} for r in rows])
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix.lower() == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        frame.to_parquet(tmp, index=False)
    os.replace(tmp, out)


def read_table(out: Path) -> list[dict[str, Any]]:
    import pandas as pd

    if not out.exists():
        return []
    frame = pd.read_csv(out) if out.suffix.lower() == ".csv" else pd.read_parquet(out)
    return [{k: v for k, v in r.items() if not _isnan(v)} for r in frame.to_dict("records")]


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and v != v


def _row(item: Item, prop: str, model: str, protocol: str, *, result: Any = None, error: str | None = None,
         status: str = "COMPLETED") -> dict[str, Any]:
    from matcalc.calculations.results import jsonable

    row: dict[str, Any] = {"key": item.key, "source": item.source, "label": item.label, "property": prop,
                           "model": model, "protocol": protocol, "structure_hash": item.structure_hash}
    if result is not None:
        row.update(jsonable(result.row()))
    row.update({"key": item.key, "source": item.source, "label": item.label, "status": status, "error": error,
                "finished_at": time.time()})
    if result is not None:
        row["structure_file"] = _write_structure(item, result)
        row["result"] = result.to_dict()
    return row


def _write_structure(item: Item, result: Any) -> str | None:
    """Write the result's final structure to ``item.structure_path`` (+ suffix); the path, or ``None``."""
    which = result.default_structure_field()
    if item.structure_path is None or which is None:
        return None
    path = item.structure_path
    frames = result.structures()[which]  # several (e.g. the lowest Widom insertions): all, in order
    if not all(a.pbc.all() and a.cell.rank == 3 for a in frames) and path.suffix in (".cif", ".vasp"):
        path = path.with_suffix(".xyz")
    index = 0 if len(frames) > 1 and path.suffix == ".vasp" else None  # POSCAR holds one: the first
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(result.write_structure(path, which, index=index))
    except (OSError, ValueError) as exc:  # the row keeps the result; the structure is also in the journal
        log.warning("%s: could not write its %s to %s: %s", item.source, which, path, exc)
        return None


def _prepare(items: list[tuple[str, str]], prop: str, model: str, protocol: str,
             params: dict[str, Any]) -> list[Item]:
    from matcalc.structures import load_structure, structure_hash

    out = []
    for source, label in items:
        item = Item(source, label)
        try:
            item.atoms = load_structure(source, require_cell=False, max_atoms=None)
            item.atoms.info["label"] = label
            item.structure_hash = structure_hash(item.atoms)
            item.key = task_key(item.structure_hash, prop, model, protocol, params)
        except ValueError as exc:
            item.error = f"{type(exc).__name__}: {exc}"
            item.key = unreadable_key(source, prop, model)
        out.append(item)
    return out


def unreadable_key(source: str, prop: str, model: str) -> str:
    """The resume key of an input that could not be read (no structure hash to key it by)."""
    return "unreadable-" + hashlib.sha256(f"{source}|{prop}|{model}".encode()).hexdigest()[:20]


def check_same_calculation(rows: dict[str, dict[str, Any]], out: Path, prop: str, model: str, protocol: str,
                           params: dict[str, Any]) -> None:
    """``ValueError`` when ``out`` (its journal or table: ``rows``) holds results of another calculation (another
    property, model, protocol or parameters): rerunning into it would replace that table. One table is one
    calculation; give each model its own ``--out`` (and ``pandas.concat`` the tables to compare them)."""
    for r in rows.values():
        h = r.get("structure_hash")
        mine = (task_key(str(h), prop, model, protocol, params) if isinstance(h, str) and h
                else unreadable_key(str(r.get("source")), prop, model))
        if r.get("key") == mine:
            continue
        theirs = (r.get("property"), r.get("model"), r.get("protocol"))
        what = (f"{theirs[0]} with model {theirs[1]} (protocol {theirs[2]})"
                if theirs != (prop, model, protocol) else f"{prop} with model {model} (protocol {protocol}) "
                                                          "and other parameters")
        tag = "".join(c if c.isalnum() or c in "-_." else "-" for c in model)
        raise ValueError(f"{out} holds results of another calculation: {what}; this run is {prop} with model "
                         f"{model} (protocol {protocol}). Writing here would replace that table: use another --out "
                         f"(e.g. {out.with_name(f'{out.stem}-{tag}{out.suffix}')}), or delete {out} and its "
                         "journal to start over")


def run_batch(prop: str, inputs: Sequence[str | Path], *, model: str = "chgnet", out: str | Path = "results.parquet",
              cluster: Any = "inprocess", protocol: str | None = None, params: dict[str, Any] | None = None,
              workers: int | None = None, priority: str = "NORMAL", timeout_s: float | None = None,
              retries: int = 0, show_progress: bool = True, flush_s: float = 2.0,
              on_result: Callable[[dict[str, Any]], None] | None = None, cache: bool | None = None,
              structures: str = "cif", cluster_options: dict[str, Any] | None = None) -> BatchSummary:
    """Run ``prop`` on every input structure and write one row per structure to ``out``.

    Args:
        prop: property name (``relax``, ``single_point``, ``bulk_modulus``...).
        inputs: files, folders (searched recursively for structure files) or builtin names.
        cluster: ``"inprocess"`` (default: threads in this process), ``"local"`` (start a local
            dask cluster: GPUs if possible), a scheduler address, or a `Cluster`.
        protocol, params: passed to the calculation (part of the resume key).
        workers: in-process: concurrent threads (default 1); ``local``: worker processes.
        flush_s: the table is rewritten at most this often (the journal at every result).
        on_result: called with each new row (after it is journaled).
        cache: the result cache (`matcalc.cache`): ``None`` = on unless ``MATCALC_CACHE=0``; ``False``
            computes every structure (the journal's resume still applies). Each row's ``result`` carries its
            provenance.
        structures: format of the final structures written to ``<out stem>_structures/<label>.<suffix>``
            (`STRUCTURE_FORMATS`: ``cif`` (default), ``extxyz``, ``vasp``, or ``none``).

    Raises:
        ValueError: a bad argument or parameter, an unknown model, or an ``out`` that holds the rows of another
            calculation (`check_same_calculation`), all before any file is written.
    """
    from tqdm.auto import tqdm

    from matcalc.calculations import get_property
    from matcalc.models.registry import model_card

    t0 = time.perf_counter()
    spec = get_property(prop)
    fn = spec.function
    prop = spec.name
    protocol_name, _ = spec.resolve(protocol, params)  # every parameter checked before anything is written
    model_card(model)  # an unknown model fails here, once, before any file exists
    params = dict(params or {})
    out = Path(out)
    if out.suffix.lower() not in (".parquet", ".csv"):
        raise ValueError(f"out must end in .parquet or .csv, got {out}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if structures not in STRUCTURE_FORMATS:
        raise ValueError(f"structures must be one of {', '.join(STRUCTURE_FORMATS)}, got {structures!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    journal = Journal(out.with_name(out.name + ".journal.jsonl"))

    items = _prepare(expand_inputs(inputs), prop, model, protocol_name, params)
    unique: dict[str, Item] = {}
    for it in items:
        if it.key in unique:
            log.info("%s is the same structure as %s; computed once", it.source, unique[it.key].source)
            continue
        unique[it.key] = it
    if STRUCTURE_FORMATS[structures]:
        folder = out.with_name(f"{out.stem}_structures")
        names = [it.label or (it.structure_hash or it.key)[:12] for it in unique.values()]
        for it, name in zip(unique.values(), names, strict=True):
            if names.count(name) > 1:  # two inputs of one name (a/x.cif, b/x.cif): told apart by their hash
                name = f"{name}-{(it.structure_hash or it.key)[:8]}"
            safe = "".join(c if c.isalnum() or c in "-_.+" else "_" for c in name)
            it.structure_path = folder / f"{safe}{STRUCTURE_FORMATS[structures]}"
    rows = journal.read()
    adopt = not rows and out.exists()  # a table from a run without journal: adopt its rows
    if adopt:
        rows = {r["key"]: r for r in read_table(out) if "key" in r}
    check_same_calculation(rows, out, prop, model, protocol_name, params)  # before anything is written
    if adopt:
        for r in rows.values():
            journal.append(r)
    done = {k for k, r in rows.items() if r.get("status") == "COMPLETED"}
    rows = {k: r for k, r in rows.items() if k in unique}  # the table covers this run's inputs
    todo = [it for k, it in unique.items() if k not in done]
    n_skipped = len(unique) - len(todo)
    if n_skipped:
        log.info("resuming: %d of %d structures already finished", n_skipped, len(unique))

    lock = threading.Lock()
    last_flush = [0.0]
    n_failed = [0]
    errors: list[str] = []
    bar = tqdm(total=len(unique), initial=n_skipped, desc=f"{prop} ({model})", unit="structure",
               disable=not show_progress)

    def record(row: dict[str, Any]) -> None:
        journal.append(row)
        with lock:
            rows[row["key"]] = row
            if row["status"] != "COMPLETED":
                n_failed[0] += 1
                errors.append(f"{row['label'] or row['source']}: {row['error']}")
            bar.update(1)
            if time.monotonic() - last_flush[0] >= flush_s:
                write_table(_ordered(rows, unique), out)
                last_flush[0] = time.monotonic()
        if on_result is not None:
            on_result(row)

    runnable = []
    for it in todo:
        if it.error is not None:
            record(_row(it, prop, model, protocol_name, error=it.error, status="FAILED"))
        else:
            runnable.append(it)
    kwargs = dict(params)
    if cache is not None:
        kwargs["cache"] = bool(cache)
    if protocol is not None:
        kwargs["protocol"] = protocol_name
    try:
        if runnable:
            if isinstance(cluster, str) and cluster.lower() in ("inprocess", "in-process", "none"):
                _run_inprocess(fn, runnable, model, kwargs, workers or 1, prop, protocol_name, record)
            else:
                _run_cluster(cluster, runnable, model, kwargs, prop, protocol_name, record, workers=workers,
                             options=cluster_options,
                             priority=priority, timeout_s=timeout_s, retries=retries)
    finally:
        bar.close()
        write_table(_ordered(rows, unique), out)
    return BatchSummary(out=out, journal=journal.path, n_inputs=len(items), n_unique=len(unique),
                        n_skipped=n_skipped, n_computed=len(runnable), n_failed=n_failed[0],
                        wall_time_s=time.perf_counter() - t0, errors=errors)


def _ordered(rows: dict[str, dict[str, Any]], unique: dict[str, Item]) -> list[dict[str, Any]]:
    return [rows[k] for k in unique if k in rows]


def _run_inprocess(fn: Callable[..., Any], items: list[Item], model: str, kwargs: dict[str, Any], threads: int,
                   prop: str, protocol: str, record: Callable[[dict[str, Any]], None]) -> None:
    def one(it: Item) -> None:
        try:
            result = fn(it.atoms, model=model, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one failure becomes one row
            log.warning("%s failed: %s: %s", it.source, type(exc).__name__, exc)
            record(_row(it, prop, model, protocol, error=f"{type(exc).__name__}: {exc}", status="FAILED"))
            return
        record(_row(it, prop, model, protocol, result=result))

    import contextlib

    try:  # numpy's BLAS at 1 thread: ASE's small linear algebra thrashes with more on shared CPUs
        from threadpoolctl import threadpool_limits

        limits: Any = threadpool_limits(limits=1, user_api="blas")
    except ImportError:  # pragma: no cover - threadpoolctl comes with scipy's stack
        limits = contextlib.nullcontext()
    with limits:
        if threads == 1:
            for it in items:
                one(it)
            return
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="matcalc-run") as pool:
            for f in [pool.submit(one, it) for it in items]:
                f.result()


def _run_cluster(cluster: Any, items: list[Item], model: str, kwargs: dict[str, Any], prop: str, protocol: str,
                 record: Callable[[dict[str, Any]], None], *, workers: int | None, priority: str,
                 timeout_s: float | None, retries: int, options: dict[str, Any] | None = None) -> None:
    from matcalc.cluster.local import Cluster, connect, start

    owned = None
    if isinstance(cluster, Cluster):
        cl = cluster
    elif isinstance(cluster, str) and cluster.lower() == "local":
        cl = owned = start(n_workers=workers, preload=(model,), **(options or {}))
    elif isinstance(cluster, str) and cluster.lower() in ("slurm", "pbs"):
        cl = owned = start(kind=cluster.lower(), preload=(model,), **(options or {}))
    elif isinstance(cluster, str) and cluster:
        cl = owned = connect(cluster, preload=(model,))
    else:
        raise ValueError(f"cluster must be 'inprocess', 'local', 'slurm', 'pbs', a scheduler address or a Cluster, "
                         f"got {cluster!r}")
    finished: queue.Queue[Any] = queue.Queue()
    tasks: list[Any] = []
    try:
        by_id = {it.key: it for it in items}
        tasks = cl.map(prop, [it.atoms for it in items], model, priority=priority, timeout_s=timeout_s,
                       retries=retries, task_id=[f"{it.key}-{os.getpid()}-{time.time_ns()}" for it in items],
                       **kwargs)
        for it, t in zip(items, tasks, strict=True):
            t.batch_key = it.key  # type: ignore[attr-defined]
            t.add_done_callback(finished.put)
        for _ in range(len(tasks)):
            t = finished.get()
            it = by_id[t.batch_key]
            if t.status.value == "COMPLETED":
                record(_row(it, prop, model, protocol, result=t.result()))
            else:
                record(_row(it, prop, model, protocol, error=t.error, status=t.status.value))
    except BaseException:
        for t in tasks:  # only this run's tasks (the cluster may be shared)
            t.cancel()
        raise
    finally:
        if owned is not None:
            owned.close()


# ---------------------------------------------------------------------------- CLI: matcalc run
def add_run_parser(sub: Any) -> None:
    """Register ``matcalc run PROPERTY ...``: one sub-command per property, its options derived from the
    property's declaration (``--n-points 7``, ``--supercell 2 2 2``; help, units and ranges from the table)."""
    import argparse

    from matcalc.calculations import properties

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("inputs", nargs="+", metavar="FILES_OR_DIR", help="structure files, folders or builtin names")
    common.add_argument("--model", default="chgnet", help="model name (default chgnet)")
    common.add_argument("--out", default="results.parquet",
                        help="output table, .parquet or .csv (default results.parquet)")
    common.add_argument("--cluster", default="inprocess",
                        help="inprocess (default), local, slurm, pbs, or a dask scheduler address such as "
                             "tcp://host:8786")
    common.add_argument("--cluster-options", default=os.environ.get("MATCALC_CLUSTER_OPTIONS"), metavar="JSON",
                        help='keywords of matcalc.cluster.start, e.g. \'{"jobs": 4, "cores": 8, "walltime": '
                             '"02:00:00", "queue": "gpu", "gpus_per_job": 4}\' (default: $MATCALC_CLUSTER_OPTIONS)')
    common.add_argument("--protocol", default=None, help="mofsimbench (default) or fast")
    common.add_argument("--workers", type=int, default=None,
                        help="in-process: concurrent threads (default 1); local: worker processes (default auto)")
    common.add_argument("--priority", default="NORMAL", help="cluster task priority: CRITICAL, HIGH, NORMAL, LOW")
    common.add_argument("--timeout", type=float, default=None, dest="timeout_s",
                        help="per-structure time limit (s), cluster only")
    common.add_argument("--retries", type=int, default=0, help="retries after transient errors, cluster only")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")
    common.add_argument("--structures", default="cif", choices=list(STRUCTURE_FORMATS),
                        help="format of the final structures written to OUT-STEM_structures/LABEL.SUFFIX "
                             "(default cif; none: do not write them)")
    common.add_argument("--no-cache", action="store_true",
                        help="compute every structure even when the result cache holds it (default: cached results "
                             "are reused, new ones stored; MATCALC_CACHE=0 turns the cache off everywhere)")
    p = sub.add_parser(
        "run", help="run one property on many structures; results written as they finish, resumable",
        description="Run PROPERTY on every structure of FILES_OR_DIR (folders are searched recursively). "
                    "Each finished structure is appended to OUT.journal.jsonl and OUT is rewritten atomically; "
                    "rerunning the same command skips structures already finished. Default execution is "
                    "in-process; --cluster local starts a dask cluster (one worker per GPU, else CPU workers), "
                    "--cluster tcp://host:8786 uses a running one. `matcalc run PROPERTY -h` lists the "
                    "property's options.")
    props = p.add_subparsers(dest="property", required=True, metavar="PROPERTY")
    for name, spec in properties().items():
        aliases = [spec.task_type] if spec.task_type != name else []
        q = props.add_parser(name, aliases=aliases, parents=[common], help=spec.summary.replace("%", "%%"),
                             description=spec.summary.replace("%", "%%"))
        group = q.add_argument_group(f"{name} parameters (default: the protocol's value)")
        for param in spec.remote_params:
            many = not isinstance(param.kind, (Number, Flag, Choice, Molecule)) or isinstance(param.kind, Either)
            group.add_argument(f"--{param.name.replace('_', '-')}", dest=f"param_{param.name}", default=None,
                               nargs="+" if many else None, metavar=param.name.upper(),
                               help=param.doc_line().replace("%", "%%"))
        q.set_defaults(func=cmd_run, spec=spec)


def params_from_args(args: Any) -> dict[str, Any]:
    """The declared parameters given on the command line (each word parsed by its kind; checked later by
    the declaration, like every other call)."""
    spec = args.spec
    out: dict[str, Any] = {}
    for param in spec.remote_params:
        raw = getattr(args, f"param_{param.name}", None)
        if raw is not None:
            text = " ".join(raw) if isinstance(raw, list) else raw
            out[param.name] = param.kind.from_text(param.name, text)
    return out


def cluster_options_from(text: str | None) -> dict[str, Any] | None:
    """``--cluster-options`` JSON -> keywords of ``matcalc.cluster.start`` (``ValueError`` when not an object)."""
    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--cluster-options must be a JSON object, got {text!r} ({exc})") from None
    if not isinstance(options, dict):
        raise ValueError(f"--cluster-options must be a JSON object, got {text!r}")
    return options


def cmd_run(args: Any) -> int:
    summary = run_batch(args.spec.name, args.inputs, model=args.model, out=args.out, cluster=args.cluster,
                        protocol=args.protocol, params=params_from_args(args), workers=args.workers,
                        priority=args.priority, timeout_s=args.timeout_s, retries=args.retries,
                        show_progress=not args.no_progress, cache=False if args.no_cache else None,
                        structures=args.structures, cluster_options=cluster_options_from(args.cluster_options))
    print(f"matcalc run: {summary.n_unique} structure(s): {summary.n_skipped} already done, "
          f"{summary.n_computed} computed, {summary.n_failed} failed, in {summary.wall_time_s:.1f} s -> {summary.out}")
    folder = summary.out.with_name(f"{summary.out.stem}_structures")
    if args.structures != "none" and folder.is_dir():
        print(f"  final structures: {folder}/")
    for e in summary.errors[:20]:
        print(f"  failed: {e}")
    return 1 if summary.n_failed else 0
