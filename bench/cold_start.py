"""Cold-start cost of a search: the compile wall on a fresh machine (issue 19).

Each case runs in its own child process with its own persistent compilation cache, first EMPTY (a user's
first run, a fresh cluster node) and then warm (the same command again). A child records every XLA
compile JAX logs (program name, seconds; ``jax_log_compiles``), persistent-cache hits, the phase lines the
search prints (``[phase] NAME done in S s``), wall time and peak device memory. Cases:

* ``turbo``     ``python -m tmp_jax.search --model <random Turbo> --budget 4B --generations 2 --population 8``
                on a random-weight 6.15B Z-Image-Turbo written in the stock diffusers layout (no ``--calib``:
                the synthetic set). ``--tiny``: the tiny Z-Image config instead.
* ``dit``       the default search (levelswitch, default length) on the embedded DiT, ``--budget 50%``.
* ``hunyuan``   calibration + search warm-up of the 4-layer full-width HunyuanImage-3.0 (random bf16 weights
                born on the device), then 6 random new candidates: compiles after the warm-up must be 0.
                ``--tiny``: the tiny config.
* ``turbo-fp32``  the cold ``turbo`` case again with ``--dtype fp32`` (the default on a GPU is bf16).
* ``rescore``    after ``turbo`` and ``turbo-fp32``: both winners' subnetworks scored in one fp32 problem.
* ``turbo-autotune0``  the cold ``turbo`` case again with ``XLA_FLAGS=--xla_gpu_autotune_level=0``: compile
                seconds saved vs search throughput lost (evaluations per second of the search phase).
* ``dit-triton`` / ``turbo-triton``: the case with XLA's Triton GEMM kernels back on (``TMP_JAX_TRITON_GEMM=1``;
                tmp_jax turns them off on a GPU: ``tmp_jax.compile_cache.gpu_compile_flags``).
* ``dit-noised``: the ``dit`` case on the old built-in calibration set (``--calib-source noised``: no teacher
                trajectory to sample, 32 instead of 120 calibration samples).
* ``dit-scan`` / ``dit-noscan``, ``dit-noprecompile`` (or combined: ``dit-noscan-noprecompile``): the ``dit``
                case with the masked program's identical blocks forced to one ``lax.scan`` (``TMP_JAX_MASKED_SCAN=1``;
                the default on accelerators) or unrolled (``=0``; the CPU default), and/or its compile left
                to the warm-up instead of overlapping the calibration (``TMP_JAX_PRECOMPILE=0``): what each buys.

With ``rescore`` in the cases, the ``turbo-fp32`` child also re-scores the plans in its own fp32 problem right
after its search (the bf16 ``turbo`` winner and its own), which saves the separate child's fp32 load and
calibration; the ``rescore`` case then runs only if that failed.

    python bench/cold_start.py --tiny --out bench-out/cold          # CPU smoke run (~2 min)
    python bench/cold_start.py --out $OUT/cold --cases turbo dit hunyuan

Writes ``OUT/cold_start.json`` (every child's record) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASE = re.compile(r"\[phase\] (\S+(?: \S+)*?) done in ([0-9.]+) s")
EVALS = re.compile(r"(\d+) evaluations \(")


# ----------------------------------------------------------------------------------------------
# child side: instrument JAX, run one case, dump a record


class _CompileLog(logging.Handler):
    """Collects ``Finished XLA compilation of NAME in S sec`` and persistent-cache hits."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.compiles: list[tuple[str, float]] = []
        self.ends: list[float] = []  # when each compile ended (seconds since the child started)
        self.cache_hits = 0
        self.t0 = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = re.match(r"Finished XLA compilation of (.+) in ([0-9.e-]+) sec", msg)
        if m:
            self.compiles.append((m.group(1), float(m.group(2))))
            self.ends.append(time.perf_counter() - self.t0)
        elif msg.startswith("Persistent compilation cache hit"):
            self.cache_hits += 1


def _instrument() -> _CompileLog:
    import jax

    h = _CompileLog()
    for name in ("jax._src.dispatch", "jax._src.compiler"):
        lg = logging.getLogger(name)
        lg.addHandler(h)
        lg.setLevel(logging.DEBUG)
        lg.propagate = False  # keep the child's stderr readable: only the phase lines and the CLI's own output
    jax.config.update("jax_log_compiles", True)
    return h


def _peak_gb() -> float | None:
    import jax

    st = jax.devices()[0].memory_stats() or {}
    return round(st["peak_bytes_in_use"] / 1e9, 2) if "peak_bytes_in_use" in st else None


def _record(h: _CompileLog, t0: float, extra: dict[str, Any]) -> dict[str, Any]:
    import jax

    top: dict[str, float] = {}
    for name, s in h.compiles:
        top[name] = top.get(name, 0.0) + s
    return {
        "wall_s": round(time.perf_counter() - t0, 2),
        "compiles": len(h.compiles),
        "compile_s": round(sum(s for _, s in h.compiles), 2),
        "cache_hits": h.cache_hits,
        "top_programs_s": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        # the long compiles as [program, seconds, ended at s]: shows what overlapped what (threads)
        "timeline": [[n, round(s, 2), round(e, 2)] for (n, s), e in zip(h.compiles, h.ends) if s >= 0.5],
        "peak_gb": _peak_gb(),
        "device": str(jax.devices()[0].device_kind),
        **extra,
    }


def child_search(argv: list[str], rec_path: str) -> int:
    h = _instrument()
    t0 = time.perf_counter()
    rescore = [p for p in os.environ.get("COLD_START_RESCORE", "").split(os.pathsep) if p]
    if not rescore:
        from tmp_jax.search import main

        rc = main(argv)
        Path(rec_path).write_text(json.dumps(_record(h, t0, {"rc": rc})))
        return rc
    # the CLI's own steps (tmp_jax.search.main), keeping the problem to re-score plans in it afterwards
    from search.engine import _build_problem, run
    from tmp_jax.compile_cache import enable_default
    from tmp_jax.search import parse_args

    cfg = parse_args(argv)
    enable_default()
    prob = _build_problem(cfg)
    run(cfg, prob)
    wall = time.perf_counter() - t0
    # the search's problem holds only the permuted teacher (keep_teacher=False): plan_fitness materialises each
    # plan from it, so an fp32 Turbo holds one 24.6 GB teacher and the candidate; the masked evaluator goes first
    prob.masked = None
    t = time.perf_counter()
    own = str(Path(cfg.out) / "plan.json")
    out = {}
    for p in [*rescore, own]:
        if Path(p).is_file():
            plan = json.loads(Path(p).read_text())
            out[p] = {
                # re-fitted with this (fp32) problem's Grams when it has them; --no-compensate: plain slices
                "fitness_in_fp32": prob.plan_fitness(plan, prob.compensation),
                "fitness_as_searched": plan.get("fitness"),
                "dtype_searched": plan.get("search", {}).get("dtype"),
            }
    rescore_s = round(time.perf_counter() - t, 2)
    extra = {"rc": 0, "search_cli_wall_s": round(wall, 2), "rescore_s": rescore_s, "rescore": out}
    Path(rec_path).write_text(json.dumps(_record(h, t0, extra)))
    return 0


def child_hunyuan(tiny: bool, layers: int, rec_path: str) -> int:
    """Calibrate the 4-layer full-width HunyuanImage and warm the search up; then new candidates."""
    h = _instrument()
    t0 = time.perf_counter()
    import jax.numpy as jnp
    import numpy as np

    from tmp_jax import arch
    from tmp_jax.calibration import calibrate
    from tmp_jax.compile_cache import enable_default
    from tmp_jax.models.hunyuan_image3.config import FULL, TINY
    from tmp_jax.problem import PruningProblem
    from tmp_jax.sharding import make_mesh, random_on_mesh

    enable_default()
    hooks = arch.get("hunyuan")
    from bench.full_scale import with_layers

    cfg = TINY if tiny else with_layers(FULL, layers)
    dtype = jnp.float32 if tiny else jnp.bfloat16
    phases: dict[str, float] = {}
    t = time.perf_counter()
    model = random_on_mesh(hooks.init_abstract(cfg, dtype), make_mesh("data:1"), seed=0)
    phases["init"] = time.perf_counter() - t
    t = time.perf_counter()
    batches = hooks.synthetic_calib(cfg, 2, 1, 0)  # two rows, one per micro-batch: one input shape
    cal = calibrate(model, batches)
    phases["calibration"] = time.perf_counter() - t
    t = time.perf_counter()
    prob = PruningProblem(model, cal, source={"path": None, "fingerprint": "cold", "config": {}})
    phases["problem"] = time.perf_counter() - t
    t = time.perf_counter()
    n_before = len(h.compiles)
    prob.warmup(progress=True)
    phases["warmup"] = time.perf_counter() - t
    warm_compiles = len(h.compiles) - n_before
    rng = np.random.default_rng(3)
    mx = prob.tree.max_levels()
    gs = rng.integers(0, mx + 1, size=(6, len(mx)))
    gs[:, [i for i, g in enumerate(prob.tree.genes) if g.kind == "keep"]] = 1
    t = time.perf_counter()
    n_before = len(h.compiles)
    f = prob.fitness(gs)
    phases["6 candidates"] = time.perf_counter() - t
    extra = {
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "warmup_compiles": warm_compiles,
        "compiles_after_warmup": len(h.compiles) - n_before,
        "fitness_finite": bool(np.all(np.isfinite(f))),
        "params": int(sum(np.prod(s) for s in prob.tree.spec.shapes.values())),
    }
    Path(rec_path).write_text(json.dumps(_record(h, t0, extra)))
    return 0


def child_rescore(model: str, plans: list[str], rec_path: str) -> int:
    """The plans' subnetworks scored in ONE float32 problem (the same synthetic calibration set the searches
    used): does the bf16 search's winner hold up in fp32 against the fp32 search's winner?"""
    h = _instrument()
    t0 = time.perf_counter()
    from tmp_jax.compile_cache import enable_default
    from tmp_jax.problem import build_problem

    enable_default()
    prob = build_problem(model, dtype="fp32", phases=True, keep_teacher=False)  # one fp32 copy of the teacher
    out = {}
    for p in plans:
        plan = json.loads(Path(p).read_text())
        out[p] = {
            "fitness_in_fp32": prob.plan_fitness(plan),
            "fitness_as_searched": plan.get("fitness"),
            "dtype_searched": plan.get("search", {}).get("dtype"),
        }
    Path(rec_path).write_text(json.dumps(_record(h, t0, {"rescore": out})))
    return 0


# ----------------------------------------------------------------------------------------------
# parent side


def make_turbo(folder: Path, tiny: bool) -> float:
    """A random-weight Z-Image-Turbo checkpoint in the stock diffusers layout (weights born on the device)."""
    if (folder / "config.json").is_file():
        return 0.0
    code = (
        "import jax.numpy as jnp, sys\n"
        "from tmp_jax import arch\n"
        "from tmp_jax.models.z_image import TINY, TURBO\n"
        "from tmp_jax.sharding import make_mesh, random_on_mesh\n"
        "h = arch.get('zimage')\n"
        f"cfg = {'TINY' if tiny else 'TURBO'}\n"
        "m = random_on_mesh(h.init_abstract(cfg, jnp.bfloat16), make_mesh('data:1'), seed=0)\n"
        f"m.save_pretrained({str(folder)!r})\n"
    )
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    return time.perf_counter() - t


def run_child(args: list[str], env_extra: dict[str, str], cache: Path, cold: bool, timeout: int) -> dict[str, Any]:
    if cold and cache.exists():
        shutil.rmtree(cache)
    cache.mkdir(parents=True, exist_ok=True)
    rec = cache.parent / f"rec-{os.getpid()}-{time.time_ns()}.json"
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(cache),
        "PYTHONUNBUFFERED": "1",
        **env_extra,
    }
    t0 = time.perf_counter()
    try:
        p = subprocess.run(
            [sys.executable, __file__, "--child-record", str(rec), "--", *args],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        out += (e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
        rc = "timeout"
    r: dict[str, Any] = json.loads(rec.read_text()) if rec.exists() else {}
    r["outer_wall_s"] = round(time.perf_counter() - t0, 2)
    r["rc"] = rc
    r.setdefault("phases_s", {})
    for name, s in PHASE.findall(out):
        r["phases_s"][name] = float(s)
    m = EVALS.findall(out)
    if m:
        r["evaluations"] = int(m[-1])
    r["tail"] = out[-1500:]
    with open(cache.parent / "logs.txt", "a") as fh:  # every child's whole output, one file
        fh.write(f"\n===== {' '.join(args)} (cache {'cold' if cold else 'warm'}, env {env_extra}) =====\n{out}")
    plans = sorted(Path(args[args.index("--out") + 1]).rglob("plan.json")) if "--out" in args else []
    if plans:
        plan = json.loads(plans[0].read_text())
        meta = plan.get("search", {})
        r["search_evals"], r["search_wall_s"] = meta.get("evals"), meta.get("wall_s")
        if r["search_evals"] and r["search_wall_s"]:  # the search phase only (after the warm-up)
            r["evals_per_s"] = round(r["search_evals"] / r["search_wall_s"], 2)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench-out/cold")
    p.add_argument("--tiny", action="store_true", help="tiny configs (a CPU smoke run)")
    p.add_argument("--cases", nargs="+", default=["turbo", "dit", "hunyuan"])
    p.add_argument("--turbo-dir", default=None, help="random Turbo checkpoint folder (default OUT/turbo-random)")
    p.add_argument("--layers", type=int, default=4, help="HunyuanImage layers (full width)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per child run")
    p.add_argument("--case-timeout", action="append", default=[], help="CASE=SECONDS: another limit for one case")
    p.add_argument(
        "--case-xla",
        action="append",
        default=[],
        help="CASE=FLAGS: XLA_FLAGS appended for one case (e.g. 'dit-notriton=--xla_gpu_enable_triton_gemm=false'): "
        "compile seconds vs search throughput of a compiler setting; the case name picks the base case by its prefix",
    )
    p.add_argument("--no-warm", action="store_true", help="cold runs only")
    p.add_argument("--search-args", default="", help="extra turbo search arguments ('--no-compensate'); dit: defaults")
    p.add_argument("--child-record", default=None, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)  # a child's own command line follows "--"
    a, rest = p.parse_args(argv[:cut]), argv[cut + 1 :]
    if a.child_record:  # child mode: the rest of the command line is the case's own
        if rest and rest[0] == "rescore":  # rescore MODEL PLAN...
            return child_rescore(rest[1], rest[2:], a.child_record)
        if rest and rest[0].startswith("hunyuan:"):  # hunyuan:LAYERS[:tiny]
            _, layers, *tiny = rest[0].split(":")
            return child_hunyuan(bool(tiny), int(layers), a.child_record)
        return child_search(rest, a.child_record)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "argv": sys.argv[1:]}
    extra = a.search_args.split()
    turbo = Path(a.turbo_dir) if a.turbo_dir else out / "turbo-random"
    limits = {k: int(v) for k, v in (x.split("=", 1) for x in a.case_timeout)}
    for case in a.cases:
        env: dict[str, str] = {}
        if case.startswith("turbo"):
            res["turbo_write_s"] = round(make_turbo(turbo, a.tiny), 1)
            budget = "75%" if a.tiny else "4B"
            args = ["--model", str(turbo), "--budget", budget, "--generations", "2", "--population", "8"]
            args += ["--out", str(out / f"search-{case}"), *extra]
            if case.endswith("-fp32"):  # the same search with the teacher and candidates in float32
                args += ["--dtype", "fp32"]
                if "rescore" in a.cases:  # and the bf16 winner re-scored in its fp32 problem afterwards
                    env["COLD_START_RESCORE"] = str(out / "search-turbo" / "plan.json")
        elif case == "rescore":  # after turbo and turbo-fp32: both winners scored in one fp32 problem
            if res.get("turbo-fp32", {}).get("cold", {}).get("rescore"):
                res[case] = {"cold": {"outer_wall_s": 0.0, "note": "done in the turbo-fp32 child"}}
                continue
            plans = [str(out / f"search-{c}" / "plan.json") for c in ("turbo", "turbo-fp32")]
            args = ["rescore", str(turbo), *[p for p in plans if Path(p).is_file()]]
        elif case.startswith("dit"):
            args = ["--model", "zimage-fmnist", "--budget", "50%", "--out", str(out / f"search-{case}")]
            if "noised" in case.split("-")[1:]:  # the old built-in set (no sampler trajectory to record)
                args += ["--calib-source", "noised"]
        elif case == "hunyuan":
            args = [f"hunyuan:{a.layers}" + (":tiny" if a.tiny else "")]
        else:
            raise SystemExit(f"unknown case {case!r}")
        flags = set(case.split("-")[1:])
        if "autotune0" in flags:
            env["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_gpu_autotune_level=0").strip()
        xla = dict(x.split("=", 1) for x in a.case_xla).get(case)
        if xla:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", os.environ.get("XLA_FLAGS", "")) + " " + xla).strip()
        if "scan" in flags or "noscan" in flags:  # the default: scanned on accelerators, unrolled on the CPU
            env["TMP_JAX_MASKED_SCAN"] = "1" if "scan" in flags else "0"
        if "triton" in flags:  # XLA's Triton GEMM kernels back on (tmp_jax turns them off on a GPU by default)
            env["TMP_JAX_TRITON_GEMM"] = "1"
        if "noprecompile" in flags:
            env["TMP_JAX_PRECOMPILE"] = "0"
        cache = out / f"cache-{case}"
        timeout = limits.get(case, a.timeout)
        runs = {"cold": run_child(args, env, cache, True, timeout)}
        print(f"{case} cold: {json.dumps({k: v for k, v in runs['cold'].items() if k != 'tail'})}", flush=True)
        if not a.no_warm and "-" not in case and case != "rescore":  # variants run cold only
            runs["warm"] = run_child(args, env, cache, False, timeout)
            print(f"{case} warm: {json.dumps({k: v for k, v in runs['warm'].items() if k != 'tail'})}", flush=True)
        res[case] = runs
        (out / "cold_start.json").write_text(json.dumps(res, indent=1))
    print("\n| case | cache | wall s | compiles | compile s | cache hits | peak GB | evals/s | phases (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in a.cases:
        for kind, r in res[case].items():
            ph = ", ".join(f"{k} {v:.1f}" for k, v in r.get("phases_s", {}).items())
            print(
                f"| {case} | {kind} | {r.get('wall_s', r['outer_wall_s'])} | {r.get('compiles')} | "
                f"{r.get('compile_s')} | {r.get('cache_hits')} | {r.get('peak_gb')} | {r.get('evals_per_s')} | {ph} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
