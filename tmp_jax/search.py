"""``python -m tmp_jax.search``: search a pruning plan under a parameter (or other) budget.

Thin CLI: :func:`main` parses flags into :class:`search.engine.SearchConfig` and calls
:func:`search.engine.run`. Configuration errors (a malformed budget, a budget below the floor, a
checkpoint from another run) print ONE line and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from search.budget import KINDS, SearchError
from search.engine import SearchConfig, run
from search.strategies import STRATEGIES
from tmp_jax import dtypes
from tmp_jax.compensate import TIMESTEP_WEIGHTS

DESCRIPTION = """\
Search which blocks, sub-layers, heads, FFN channels and experts of a diffusion transformer to keep
under a budget, and write OUT/plan.json (format: docs/plan-format.md), OUT/history.jsonl,
OUT/pareto.png and checkpoints for --resume.

Progress: stderr names each phase as it starts and ends ('[phase] loading', 'calibration', 'compiling'
(every width level's programs, once), 'searching'), with a progress bar and ETA inside the long ones.

What a budget counts (--budget-kind):
  params  every parameter of the prunable transformer as counted by Tree.count: all parameters of
          the model class, including the patch/caption/timestep embedders and the final layer; NOT
          the text encoder or the VAE (default)
  active  parameters used per token (MoE: only the top-k routed experts count)
  memory  weight bytes at the checkpoint dtype (accepts 24G, 24GB, 24GiB)
  flops   matmul FLOPs of one forward pass at the problem's token counts
"""

EPILOG = """\
examples:
  python -m tmp_jax.search --budget 75%                      # embedded default model
  python -m tmp_jax.search --model ckpt/ --budget 4B --calib calib/ --out runs/4b
  python -m tmp_jax.search --model ckpt/ --budget 3B,4B,5B --generations 200   # a plan per budget
  python -m tmp_jax.search --model ckpt/ --budget 4B --strategy oneshot        # baseline
  python -m tmp_jax.search --model omni/ --budget 4B --calib mixed/ --task t2i:0.7,ti2i:0.3   # T2I + editing
"""


def parse_args(argv: Sequence[str] | None = None) -> SearchConfig:
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.search",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default=None, help="checkpoint folder or preset name (default: the embedded tiny model)")
    p.add_argument(
        "--budget",
        required=True,
        help="absolute (20B, 4B, 350M, 1.5e6) or relative to the full model (25%%, 0.25); several "
        "comma-separated values (20B,30B) give one plan per budget from one shared search",
    )
    p.add_argument("--budget-kind", default="params", choices=KINDS, help="what the budget counts (see above)")
    p.add_argument("--calib", default=None, help="calibration folder (default: built-in calibration set)")
    p.add_argument(
        "--calib-source",
        default="trajectory",
        choices=["trajectory", "noised"],
        help="the embedded teachers' built-in calibration set (without --calib): 'trajectory' (default) = the "
        "teacher's own CFG sampler states at the inference sigma grid (sigma = 1 first), each with and without "
        "the prompt, and the fitness compares the guided output u + w (c - u) with early steps weighted more; "
        "'noised' = noised training images at random sigma, the plain denoiser output",
    )
    p.add_argument("--out", default="search-out", help="output folder (default: search-out)")
    p.add_argument(
        "--strategy",
        default="levelswitch",
        choices=list(STRATEGIES),
        help="levelswitch (default, EvoPress-style evolution), ga, cmaes (evosax); baselines uniform, "
        "oneshot, depth, random",
    )
    p.add_argument("--population", type=int, default=None, help="offspring / population per generation")
    p.add_argument("--generations", type=int, default=None, help="generations (iterative strategies)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-changes",
        type=int,
        default=None,
        help="levelswitch: cap on the total level changes of an offspring vs its parent, sum |child - parent| "
        "over genes (a level switch is 2, or more where its partner must go down several levels to pay for the "
        "up-move; what repair/fill add counts too). Default 4",
    )
    p.add_argument(
        "--cross-kind",
        type=float,
        default=None,
        help="levelswitch: probability that a level switch pairs genes of different kinds (else one gene up and "
        "one of the same kind down at equal cost, e.g. a head for a head), so the budget can move between heads "
        "and FFN channels, experts and expert width, blocks and widths. Default 0.25",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=None,
        help="levelswitch: generations without a better plan (per budget) after which offspring may make twice the "
        "level changes, then 4x; any improvement goes back to local moves. 0 turns this off. Default 4",
    )
    p.add_argument(
        "--start",
        default=None,
        choices=["auto", "all", "dp", "classic"],
        help="levelswitch start: classic (default) = the best of uniform, filled uniform and oneshot; all = those "
        "and the tree DP (a knapsack over per-node error-vs-cost curves, from each gene level's output error "
        "measured alone in the full model: one evaluation per gene level); dp = the tree DP only; auto = all where "
        "the DP's evaluations are at most 1/4 of the search's, else classic. The DP start is the best start on "
        "the embedded teachers but its search ends worse at the default length (docs/quality.md)",
    )
    p.add_argument(
        "--fresh-batches",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="levelswitch: each selection stage below all samples reads fresh calibration micro-batches (a random "
        "first micro-batch per stage; default). --no-fresh-batches: always the first ones",
    )
    p.add_argument(
        "--recover-steps",
        type=int,
        default=0,
        help="recoverability: distil each budget's --recover-top best candidates for this many steps (in memory, "
        "against the teacher, on --calib or the model's data pipeline) and pick the best RECOVERED one as the plan "
        "(the best pruned model is not always the best recovered one). 0 (default): the best pruned one",
    )
    p.add_argument("--recover-top", type=int, default=4, help="candidates per budget for --recover-steps (default 4)")
    p.add_argument(
        "--rollout-steps",
        type=int,
        default=0,
        help="last selection stage: each budget's --rollout-top best candidates sample --rollout-samples latents "
        "with this many CFG Euler steps from the teacher's noise; the one whose final latents are closest to the "
        "teacher's becomes the plan (errors that compound along the sampler, which a one-step fitness misses; "
        "class-conditioned teachers such as the embedded ones). With --recover-steps, the recovered one wins. "
        "0 (default): off",
    )
    p.add_argument("--rollout-top", type=int, default=4, help="candidates per budget for --rollout-steps (default 4)")
    p.add_argument(
        "--rollout-samples", type=int, default=40, help="samples per candidate for --rollout-steps (default 40)"
    )
    p.add_argument(
        "--reconstruct-steps",
        type=int,
        default=0,
        help="reconstructability: re-fit each budget's --reconstruct-top best candidates block by block "
        "(tmp_jax.reconstruct with this many Adam steps per block, on the calibration set) and pick the one with the "
        "least fitness AFTER the re-fit as the plan: the one the cluster-free path (python -m tmp_jax.reconstruct) "
        "re-fits best. The candidates are the best of each structure (set of dropped blocks and sub-layers) first, "
        "then the next best (the re-fit repairs some plans far more than others: docs/quality.md). Applied after "
        "--rollout-steps, before --recover-steps. 0 (default): off",
    )
    p.add_argument(
        "--reconstruct-top", type=int, default=4, help="candidates per budget for --reconstruct-steps (default 4)"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.json")
    p.add_argument("--mesh", default=None, help="device mesh spec for the fitness, e.g. data:8")
    p.add_argument(
        "--task",
        default=None,
        help="tasks of the calibration set to use and their weights: t2i,ti2i (equal) or t2i:0.7,ti2i:0.3; "
        "importance and fitness are the weighted per-task combinations (default: every task of the set, equal)",
    )
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="compensated pruning (default): calibration also gathers each consumer's input Gram; units are "
        "ordered by greedy structured OBS and every candidate is scored with its kept to_out / w2 / o_proj rows "
        "re-fitted by least squares; the Grams are saved next to the plan (compensation.safetensors) so "
        "export and distill reproduce the weights. --no-compensate: prefix slicing only (ablation)",
    )
    p.add_argument("--damp", type=float, default=0.01, help="re-fit ridge, a fraction of the Gram's mean diagonal")
    p.add_argument(
        "--gram-stride",
        type=int,
        default=1,
        help="the Grams read every N-th token: N x cheaper Gram statistics during calibration (default 1)",
    )
    p.add_argument(
        "--gram-timestep-weight",
        default="uniform",
        choices=list(TIMESTEP_WEIGHTS),
        help="each calibration sample's weight in the Grams by its noise level sigma: uniform (default) or "
        "high-noise (w = sigma: the re-fit favours the high-noise steps that fix the layout); recorded in the plan",
    )
    dtypes.add_argument(
        p,
        help="dtype the teacher is loaded in and every candidate evaluated in: bf16, fp32 or auto (default: auto "
        "= bf16 on a GPU/TPU, fp32 on the CPU). bf16 halves the teacher's memory and runs the GEMMs at bf16 rate; "
        "statistics and Grams are accumulated in fp32, the fitness computed in fp64 on the host and the "
        "compensation re-fits solved in fp32/fp64 either way. Recorded in plan.json (search.dtype) and in the "
        "calibration and search resume states (a run in another dtype does not resume them)",
    )
    p.add_argument(
        "--eval-mode",
        default="auto",
        choices=["auto", "masked", "sliced"],
        help="candidate evaluation: masked = one full-width program for every candidate, pruning as runtime "
        "masks (no per-width compiles; full-width FLOPs); sliced = per-sub-layer programs at the kept widths "
        "(one compile per width level); auto (default) = masked below 1e9 teacher parameters (1e6 on the CPU)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars. The phase lines stay: '[phase] loading ...' / '[phase] loading done in 12.3 s' on "
        "stderr at the start and end of loading, calibration, compiling and searching (a few lines per run), so "
        "a cold run that compiles for minutes is never silent; redirect stderr to drop them",
    )
    a = p.parse_args(argv)
    dtype = dtypes.from_args(p, a.dtype)
    if not a.damp > 0:
        p.error(f"--damp must be > 0, got {a.damp}")
    if a.gram_stride < 1:
        p.error(f"--gram-stride must be >= 1, got {a.gram_stride}")
    if a.recover_steps < 0 or a.recover_top < 1:
        p.error(f"--recover-steps must be >= 0 and --recover-top >= 1, got {a.recover_steps} and {a.recover_top}")
    if a.reconstruct_steps < 0 or a.reconstruct_top < 1:
        p.error(
            f"--reconstruct-steps must be >= 0 and --reconstruct-top >= 1, got {a.reconstruct_steps} and "
            f"{a.reconstruct_top}"
        )
    if a.rollout_steps < 0 or a.rollout_top < 1 or a.rollout_samples < 1:
        p.error(
            f"--rollout-steps must be >= 0, --rollout-top and --rollout-samples >= 1, got {a.rollout_steps}, "
            f"{a.rollout_top} and {a.rollout_samples}"
        )
    if a.max_changes is not None and a.max_changes < 2:
        p.error(f"--max-changes must be >= 2 (one level switch), got {a.max_changes}")
    if a.patience is not None and a.patience < 0:
        p.error(f"--patience must be >= 0 (0: off), got {a.patience}")
    if a.cross_kind is not None and not 0.0 <= a.cross_kind <= 1.0:
        p.error(f"--cross-kind must be in [0, 1], got {a.cross_kind}")
    return SearchConfig(
        budget=a.budget,
        model=a.model,
        budget_kind=a.budget_kind,
        calib=a.calib,
        calib_source=a.calib_source,
        out=a.out,
        strategy=a.strategy,
        population=a.population,
        generations=a.generations,
        seed=a.seed,
        resume=a.resume,
        mesh=a.mesh,
        progress=not a.no_progress,
        task=a.task,
        compensate=a.compensate,
        damp=a.damp,
        gram_stride=a.gram_stride,
        gram_timestep_weight=a.gram_timestep_weight,
        dtype=dtype,
        eval_mode=a.eval_mode,
        max_changes=a.max_changes,
        cross_kind=a.cross_kind,
        patience=a.patience,
        start=a.start,
        fresh_batches=a.fresh_batches,
        recover_steps=a.recover_steps,
        recover_top=a.recover_top,
        rollout_steps=a.rollout_steps,
        rollout_top=a.rollout_top,
        rollout_samples=a.rollout_samples,
        reconstruct_steps=a.reconstruct_steps,
        reconstruct_top=a.reconstruct_top,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    from tmp_jax.compile_cache import enable_default

    enable_default()  # persistent XLA compilation cache (TMP_JAX_COMPILATION_CACHE=off disables)
    try:
        run(cfg)
    except SearchError as e:
        print(f"tmp_jax.search: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
