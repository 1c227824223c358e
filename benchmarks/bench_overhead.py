"""Benchmark 4: overhead = matcalc wall time / time inside the model, for the same evaluations.

"Inside the model" is the potential's batched call (structure conversion, graph building, forward and
backward pass) as timed by the engine; on the peers' side, the time inside the ASE calculator's
``calculate``. Three matcalc paths: ``relax`` one structure after the other (one caller: the engine must
add no latency), ``relax_many`` (concurrent, fused), and ``map_property("single_point")``.
"""

from __future__ import annotations

import _common as c

args = c.parse(__doc__.splitlines()[0], n_default=4)

from ase.filters import FrechetCellFilter  # noqa: E402
from ase.optimize import LBFGS  # noqa: E402

import matcalc  # noqa: E402
from matcalc import batching  # noqa: E402
from matcalc.calculations.many import map_property, relax_many  # noqa: E402
from matcalc.models import get_model  # noqa: E402


def measure(name, fn, engine, rows):
    engine.reset_stats()
    wall, _ = c.clock(fn)
    s = engine.stats_snapshot()
    rows.append((name, wall, s.model_time_s))
    print(f"{name:<36} wall {wall:8.2f} s | model {s.model_time_s:8.2f} s | overhead {wall / s.model_time_s:.3f} "
          f"| {s.calls} model calls, mean batch {s.mean_batch_size:.1f}, wait {s.wait_s:.2f} s summed")


def main() -> None:
    c.header("Benchmark 4: overhead (wall time / time inside the model)", args)
    pot = get_model(args.model, args.device)
    cells = c.rattled_cells(args.n, args.names, args.rattle)
    engine = batching.engine_for(pot)
    matcalc.relax(cells[0], model=pot, protocol="fast", max_steps=2)  # warm-up
    for rep in range(args.repeat):
        print(f"-- run {rep + 1}")
        rows: list = []
        measure("relax, one after the other", lambda: [matcalc.relax(a, model=pot, protocol="fast")
                                                        for a in cells], engine, rows)
        measure("relax_many (concurrent)", lambda: relax_many(cells, model=pot, protocol="fast", progress=False),
                engine, rows)
        measure("map_property single_point", lambda: map_property("single_point", cells * 4, model=pot,
                                                                  progress=False), engine, rows)
        if getattr(pot, "family", "") == "chgnet":
            timed = c.Timed(c.peer_calculator(pot, args.device))

            def peer():
                for atoms in cells:
                    a = atoms.copy()
                    a.calc = timed.calc
                    LBFGS(FrechetCellFilter(a), logfile=None).run(fmax=0.05, steps=500)

            wall, _ = c.clock(peer)
            print(f"{'peer ASE loop (reference)':<36} wall {wall:8.2f} s | model {timed.model_time_s:8.2f} s | "
                  f"overhead {wall / timed.model_time_s:.3f} | {timed.calls} calculator calls")
        worst = max(w / m for _, w, m in rows)
        print(f"RESULT overhead run {rep + 1}: worst matcalc path {worst:.3f} (target <= 1.15: "
              f"{'meets' if worst <= 1.15 else 'ABOVE'})")
    batching.shutdown()


if __name__ == "__main__":
    main()
