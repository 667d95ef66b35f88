"""Test session setup: 8 fake CPU devices, persistent compilation cache, deterministic torch."""

import os


def pin_xdist_worker(cpus: list[int], worker: str | None, n_workers: int) -> list[int] | None:
    """The CPUs an xdist worker keeps: worker ``gw<i>`` of ``n_workers`` gets every ``n_workers``-th of ``cpus``
    from the i-th; None (no pinning) outside xdist, for one worker, or with fewer CPUs than workers.

    Why: XLA sizes its CPU thread pools (execution and compile) by the CPUs a process may run on. Unpinned, each
    of ``make test``'s two workers runs pools as wide as the machine, and on a 2-core machine the two processes'
    threads preempt each other: measured on one, two copies of tests/test_masked_eval.py side by side took 82 s
    each unpinned (81 CPU s each) and 67 s each pinned to one core apiece (67 CPU s, as one copy alone)."""
    if not worker or not worker.startswith("gw") or n_workers < 2 or len(cpus) < n_workers:
        return None
    i = int(worker[2:])
    return cpus[i % n_workers :: n_workers]


def _pin_this_worker() -> None:
    """:func:`pin_xdist_worker` applied to every thread of this process (before jax starts its thread pools).
    Opt-in (``TMP_JAX_TEST_PIN=1``): on the 2-core CI machine, two back-to-back cold ``make test`` runs of one fresh
    clone (6c3308c, 2026-12-06) took 918.9 s of tests pinned and 852.9 s unpinned; a pinned worker cannot use the
    other core once its own half is done, and the halves never end together."""
    if not hasattr(os, "sched_setaffinity") or os.environ.get("TMP_JAX_TEST_PIN", "0") != "1":
        return
    keep = pin_xdist_worker(
        sorted(os.sched_getaffinity(0)),
        os.environ.get("PYTEST_XDIST_WORKER"),
        int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")),
    )
    if keep is None:
        return
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.sched_setaffinity(int(tid), keep)
        except OSError:  # a thread that ended meanwhile
            pass


_pin_this_worker()

# Must be set before jax is imported anywhere.
# --xla_backend_optimization_level=0: the suite is compile-bound (tiny models, hundreds of programs), so LLVM's
# optimisation passes cost more than the slower code they save. Measured cold on the 2-core machine, the four
# heaviest modules (test_distill, test_hunyuan_fmnist, test_hunyuan_ti2i_mixed, test_ti2i_mixed; -n 2): 305 s at
# XLA's default, 251 s at level 0 (compute-bound tests got slower, e.g. the MoE search fixture 31 -> 50 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ.get("JAX_COMPILATION_CACHE_DIR", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # the torch extra is optional; parity tests importorskip it
    pass


# Measured cost of each test module (seconds of one worker of ``make test`` on a 2-core machine, fresh clone, cold
# compilation cache, workers pinned as above; branch ci-trim over ca5afae). ``make test`` runs ``-n 2 --dist
# worksteal``: xdist hands each worker one contiguous half of the collection and an idle worker steals from the TAIL
# of the other's queue, so a slow module collected last is the run's critical path. The hook below splits the
# modules into two halves of about equal cost, each half slowest module first (modules stay whole: their
# module-scoped fixtures are set up once). A module not listed here (a new one, or one under 10 s) counts as fast
# and runs in a tail, where stealing balances it.
MODULE_COST_S = {
    "test_distill": 184,
    "test_hunyuan_fmnist": 168,
    "test_hunyuan_ti2i_mixed": 102,
    "test_ti2i_mixed": 83,
    "test_masked_eval": 65,
    "test_streamed_calibration": 60,
    "test_reconstruct": 61,  # alone, warm cache, 2026-12-07 (added after the run above)
    "test_zimage_omni": 47,
    "test_compensate": 38,
    "test_gram_timestep_weight": 38,
    "test_quality": 36,
    "test_contract": 33,  # cold, alone, on this 2-core machine (the other numbers: a full make-test run)
    "test_zimage_stats_fused": 32,
    "test_zimage_parity": 32,
    "test_trajectory": 32,
    "test_hunyuan_instruct": 29,
    "test_dtype_phases": 27,
    "test_recover": 26,
    "test_compensate_export": 23,
    "test_hunyuan_sharded": 23,
    "test_hunyuan_parity": 20,
    "test_masked_precompile": 20,
    "test_search": 19,
    "test_tree": 17,
    "test_compile_law": 16,
    "test_tree_hunyuan": 15,
    "test_data_and_teacher": 15,
    "test_expert_order": 12,
    "test_hunyuan_fmnist_nemo": 11,
    "test_zimage_shapes": 10,
}


def balanced_module_order(modules: list[tuple[str, int]], cost: dict[str, float]) -> list[str]:
    """Module names (with their test counts) in the order that gives two workers equal, slowest-first halves.

    Listed modules, slowest first, go to the half with less cost; unlisted ones to the half with fewer tests,
    so both halves hold about len//2 tests. The half with more tests goes first: the worker that takes the
    first len//2 tests starts at that half's head, the other worker at most a few of its cheap last tests."""
    halves: list[list[str]] = [[], []]
    load, count = [0.0, 0.0], [0, 0]
    for name, n in sorted(modules, key=lambda m: -cost.get(m[0], 0.0)):
        key = load if cost.get(name, 0.0) > 0 else count
        h = 0 if key[0] <= key[1] else 1
        halves[h].append(name)
        load[h] += cost.get(name, 0.0)
        count[h] += n
    first, second = (0, 1) if count[0] >= count[1] else (1, 0)
    return halves[first] + halves[second]


def pytest_collection_modifyitems(config, items):
    by_module: dict[str, list] = {}
    for item in items:
        by_module.setdefault(item.module.__name__ if item.module else item.nodeid, []).append(item)
    order = balanced_module_order([(m, len(v)) for m, v in by_module.items()], MODULE_COST_S)
    items[:] = [item for m in order for item in by_module[m]]
