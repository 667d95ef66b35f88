"""Full-scale dry run of the whole pipeline on the 83B HunyuanImage-3.0 shape (issue 11).

Random weights are generated ON THE DEVICES, each parameter directly in its rule-resolved sharding on
the mesh (experts over ``expert``, batch over ``data``); nothing full-size touches the host. Stages,
each timed, with memory per device after it:

1. init        the full config (32 layers, 64 experts top-8, hidden 4096; ~166 GB in bf16) on the mesh
2. source      (optional, ``--source DIR``) the checkpoint written in the OFFICIAL layout, streamed one
               tensor at a time, so that stage 6 exports from a real file
3. calibrate   sharded statistics collection on a synthetic 1024^2 T2I set (4096 image tokens per row)
4. search      the search engine at ``--budget 20B`` for a few generations (zero recompiles after warm-up)
5. materialise the winning subnetwork on the devices (checked: its parameter count equals the plan's)
6. export      ``converters.export`` of the plan from the stage-2 checkpoint (streamed, atomic)

Then a projection of a full search (default population x generations) from the measured seconds per
candidate evaluation.

    python bench/full_scale.py --tiny                      # CPU, 8 fake devices, tiny config, ~1 min
    python bench/full_scale.py --mesh data:1,expert:8 --source /data/hy3-random --out $OUT   # 8 GPUs

The cluster-free re-fit of the winner, on the stage-2 checkpoint, runs as its own process afterwards (the model of
stage 1 no longer holds the device), streamed block by block:

    python -m tmp_jax.reconstruct --plan OUT/search/plan.json --model SOURCE --streamed on --dtype bf16 \
        --micro-batch 1 --out OUT/rec         # then: python -m converters.export ... --weights OUT/rec/weights

Multi-host: start one process per host with ``--distributed`` (calls ``jax.distributed.initialize()``,
which reads SLURM's variables); the mesh then spans every host's devices. Stage 2 and 6 gather one tensor
at a time to the host, which needs every shard addressable: on several hosts run them on one host
(``--skip-source``) or from a shared file system with the single-host command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny config on 8 fake CPU devices (a smoke run)")
    p.add_argument("--mesh", default=None, help="mesh spec, e.g. data:1,expert:8 (default: expert over all)")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (default: the release's 32)")
    p.add_argument("--budget", default=None, help="parameter budget (default 20B; tiny: 50%%)")
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--population", type=int, default=8)
    p.add_argument("--calib-rows", type=int, default=8, help="calibration rows (1024^2 each at full size)")
    p.add_argument("--calib-batch", type=int, default=2, help="rows per calibration micro-batch")
    p.add_argument("--source", default=None, help="folder to write the random source checkpoint to")
    p.add_argument("--out", default="bench-out/full-scale", help="results folder (search run, export, json)")
    p.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
    p.add_argument("--skip-export", action="store_true")
    return p.parse_args(argv)


def mem_per_device() -> list[dict[str, float]]:
    """GB in use / peak per local device (empty where the backend keeps no statistics, e.g. CPU)."""
    import jax

    out = []
    for d in jax.local_devices():
        s = d.memory_stats() or {}
        if s:
            out.append(
                {
                    "device": str(d),
                    "in_use_gb": s.get("bytes_in_use", 0) / 1e9,
                    "peak_gb": s.get("peak_bytes_in_use", 0) / 1e9,
                    "limit_gb": s.get("bytes_limit", 0) / 1e9,
                }
            )
    return out


def param_bytes_per_device(model: Any) -> dict[str, float]:
    """GB of parameters resident on each device, from the shards themselves (works on CPU too)."""
    import jax
    from flax import nnx

    per: dict[str, float] = {}
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        for s in x.addressable_shards:
            per[str(s.device)] = per.get(str(s.device), 0.0) + s.data.nbytes / 1e9
    return per


def with_layers(cfg: Any, n_layers: int, **scalars: Any) -> Any:
    """``cfg`` with ``n_layers`` layers: every per-layer list takes its first entry (or ``scalars``)."""
    import dataclasses

    kw = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if isinstance(v, (list, tuple)) and len(v) == cfg.num_hidden_layers and f.name != "vae_downsample_factor":
            v = [scalars.get(f.name, v[0])] * n_layers
        kw[f.name] = v
    return dataclasses.replace(cfg, **{**kw, "num_hidden_layers": n_layers})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.tiny:
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if args.distributed:
        jax.distributed.initialize()
    import jax.numpy as jnp
    import numpy as np

    from search.engine import SearchConfig, load_plan, plan_assignment
    from search.engine import run as run_search
    from tmp_jax.calibration import calibrate
    from tmp_jax.fileio import fingerprint
    from tmp_jax.materialize import materialize
    from tmp_jax.models.hunyuan_image3 import structure as hs
    from tmp_jax.models.hunyuan_image3.config import FULL, TINY
    from tmp_jax.problem import PruningProblem
    from tmp_jax.sharding import make_mesh, random_on_mesh

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.tiny:
        cfg = with_layers(TINY, 4, num_experts=8, moe_topk=2)
        dtype = jnp.float32
        budget = args.budget or "50%"
    else:
        cfg = FULL if args.layers is None else with_layers(FULL, args.layers)
        dtype = jnp.bfloat16
        budget = args.budget or "20B"
    n_dev = jax.device_count()
    mesh = make_mesh(args.mesh or f"expert:{n_dev}")
    from tmp_jax.models.hunyuan_image3.kernels import maybe_expert_parallel

    expert_parallel = maybe_expert_parallel(mesh)  # routed experts under shard_map on the expert axis
    res: dict[str, Any] = {
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "processes": jax.process_count(),
        "mesh": dict(mesh.shape),
        "expert_parallel": expert_parallel,
        "config": {"layers": cfg.num_hidden_layers, "experts": cfg.num_experts[0], "hidden": cfg.hidden_size},
        "budget": budget,
        "stages": {},
    }

    def stage(name: str, t0: float, **extra: Any) -> None:
        wall = time.perf_counter() - t0
        res["stages"][name] = {"wall_s": round(wall, 2), "memory": mem_per_device(), **extra}
        print(f"[{name}] {wall:.1f}s {json.dumps(extra, default=str)[:300]}", flush=True)
        (out / "full_scale.json").write_text(json.dumps(res, indent=1, default=str))

    # 1. init ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model = random_on_mesh(hs.init_abstract(cfg, dtype), mesh, seed=0)
    jax.block_until_ready(jax.tree.leaves(model))
    per = param_bytes_per_device(model)
    stage("init", t0, param_gb_per_device=max(per.values()), param_gb_total=sum(per.values()))

    # 2. source checkpoint in the official layout ---------------------------------------------------
    src_path = None
    if args.source:
        t0 = time.perf_counter()
        from tmp_jax.models.hunyuan_image3.train import save

        src_path = Path(args.source)
        save(model, src_path, overwrite=True)
        size = sum(f.stat().st_size for f in src_path.glob("*.safetensors"))
        stage("source", t0, gb_written=size / 1e9)
    cfg_dict = cfg.to_hf_config()
    source = {"path": str(src_path or "random"), "fingerprint": fingerprint(src_path, cfg_dict), "config": cfg_dict}

    # 3. calibration -------------------------------------------------------------------------------
    t0 = time.perf_counter()
    batches = hs.synthetic_calib(cfg, args.calib_rows, args.calib_batch, seed=0)
    tokens = sum(int(b["valid_lengths"].sum()) for b in batches)
    cal = calibrate(model, batches, mesh=mesh, progress=True)
    wall = time.perf_counter() - t0
    stage("calibrate", t0, rows=args.calib_rows, tokens=tokens, tokens_per_s=tokens / wall)

    # 4. search ----------------------------------------------------------------------------------
    t0 = time.perf_counter()
    problem = PruningProblem(model, cal, source=source)
    t_prob = time.perf_counter() - t0
    t1 = time.perf_counter()
    n_variants = problem.warmup()
    t_warm = time.perf_counter() - t1
    compiles_after_warmup = problem.compile_count()
    t1 = time.perf_counter()
    scfg = SearchConfig(
        budget=budget,
        out=str(out / "search"),
        generations=args.generations,
        population=args.population,
        progress=True,
        summary=False,
    )
    sres = run_search(scfg, problem)
    t_search = time.perf_counter() - t1
    new_compiles = problem.compile_count() - compiles_after_warmup
    evals = max(sres.evals, 1)
    s_per_eval = t_search / evals  # includes the engine's own warm-up pass (already compiled)
    from search.strategies import STRATEGIES

    strat_cls = STRATEGIES["levelswitch"]
    full_evals = getattr(strat_cls, "default_population", 16) * getattr(strat_cls, "default_generations", 50)
    stage(
        "search",
        t0,
        problem_build_s=round(t_prob, 2),
        warmup_s=round(t_warm, 2),
        compiled_variants=n_variants,
        compiles_during_search=new_compiles,
        evals=sres.evals,
        s_per_eval=round(s_per_eval, 3),
        search_s=round(t_search, 2),
        projected_full_search_h=round(full_evals * s_per_eval / 3600, 3),
        projected_full_search_evals=full_evals,
    )
    plan_path = sres.plan_paths[0]
    plan = load_plan(plan_path)

    # 5. materialise -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    a = plan_assignment(plan)
    small = materialize(problem.teacher_model, problem.tree, a, problem.order)
    jax.block_until_ready(jax.tree.leaves(small))
    from flax import nnx

    n_small = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(small, nnx.Param)))
    want = int(plan["counts"]["after"]["params"])
    stage("materialise", t0, params=n_small, plan_params=want)
    if n_small != want:
        raise SystemExit(f"materialised {n_small:,} parameters but the plan says {want:,}")
    del small

    # 6. export ----------------------------------------------------------------------------------
    if src_path is not None and not args.skip_export:
        from converters.export import ExportConfig, export

        t0 = time.perf_counter()
        summ = export(ExportConfig(plan=plan_path, model=src_path, out=out / "export", overwrite=True, progress=True))
        size = sum(f.stat().st_size for f in (out / "export").glob("*.safetensors"))
        stage("export", t0, gb_written=size / 1e9, summary=summ)
    print(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
