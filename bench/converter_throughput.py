"""Converter throughput: streaming load / save of a Z-Image checkpoint vs raw file reads, and peak RSS.

Writes a synthetic checkpoint with the real diffusers key names at Turbo width (dim 3840, FFN 10240)
but fewer blocks (a pruned config: ``n_layers`` main blocks given by ``layers_kept``, plus the 2+2
refiners), sharded like a real diffusers folder, then measures in fresh subprocesses:

* raw read: ``cat shard... > /dev/null``;
* load: :func:`converters.zimage.load_zimage` (parse, strict checks, read, transpose, device_put) until
  every array is ready; throughput = tensor bytes / wall time;
* save: :func:`converters.zimage.save_zimage` into a new folder (page cache; ``sync`` timed separately);
* peak RSS of the load / save itself: the kernel's high-water mark (``VmHWM``), reset through
  ``/proc/self/clear_refs`` right before the timed call.

Page cache: dropping the global cache needs privileges and disturbs everything else on the machine, so
every comparison is made in one stated cache state for both sides: **warm** (each file read once
before, both ``cat`` and the load served from the page cache) and **cold** (each shard evicted from the
page cache with ``posix_fadvise(POSIX_FADV_DONTNEED)`` right before each of ``cat`` and the load).

    python bench/converter_throughput.py                 # ~3 GB bf16 checkpoint under bench-out/
    python bench/converter_throughput.py --layers 1      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# A child measuring an older engine (--old-ref) imports the converters from that checkout instead.
CODE_ROOT = Path(os.environ.get("BENCH_CODE_ROOT", REPO))
sys.path.insert(0, str(CODE_ROOT))

GB = 1e9


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def evict(files: list[Path]) -> None:
    """Drop these files' clean pages from the page cache (no privileges needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def bench_config(layers: int):
    from tmp_jax.models.z_image import TURBO

    kept = tuple(round(i * 29 / max(layers - 1, 1)) for i in range(layers)) if layers > 1 else (0,)
    return TURBO.replace(n_layers=layers, layers_kept=kept)


# ------------------------------------------------------------------------------------------------
# Synthetic checkpoint (written with the engine's streaming writer, values random)


def write_synthetic(folder: Path, layers: int, dtype: str, shard_bytes: int) -> None:
    import ml_dtypes
    import numpy as np

    from converters.engine import NP_TO_ST, PlannedTensor, StreamingWriter, write_json
    from converters.zimage import DIFFUSERS_VERSION, WEIGHTS_PREFIX, zimage_key_table

    cfg = bench_config(layers)
    np_dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bf16" else np.dtype(np.float32)
    table = zimage_key_table(cfg)
    planned = [
        PlannedTensor(k, tuple(s), NP_TO_ST[np_dt]) for e in table.entries for k, s in zip(e.torch_keys, e.torch_shapes)
    ]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w = StreamingWriter(tmp, planned, prefix=WEIGHTS_PREFIX, max_shard_bytes=shard_bytes)
    for t in planned:
        n = int(np.prod(t.shape))
        w.write(t.key, (rng.standard_normal(n, np.float32) * 0.02).astype(np_dt).reshape(t.shape))
    w.finish()
    conf = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": DIFFUSERS_VERSION}
    conf.update(cfg.to_hf_config())
    write_json(tmp / "config.json", conf)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ------------------------------------------------------------------------------------------------
# Children (fresh processes: clean RSS accounting)


def child_load(folder: Path, cold: bool, variant: str) -> dict:
    """One timed load. ``variant``: ``old`` (load_zimage of the --old-ref checkout) or a
    ``transpose_on`` mode of the current engine (``auto`` / ``host`` / ``device`` / ``legacy``)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from converters.engine import SafetensorsReader, load_into
    from converters.zimage import load_zimage, read_config, zimage_key_table
    from tmp_jax.models.z_image.model import init_abstract

    jax.devices()
    jnp.zeros(1).block_until_ready()
    if cold:
        evict(shards(folder))
    base = _status("VmRSS")
    ok = _reset_peak()
    load1 = os.getloadavg()[0]
    t0 = time.perf_counter()
    if variant == "old":
        model = load_zimage(folder, dtype=jnp.bfloat16)
    else:  # the same steps as load_zimage, with the placement mode chosen
        cfg = read_config(folder)
        model = load_into(
            init_abstract(cfg, jnp.bfloat16),
            zimage_key_table(cfg),
            SafetensorsReader(folder),
            dtype=jnp.bfloat16,
            transpose_on=variant,
        )
    leaves = jax.tree.leaves(nnx.state(model))
    jax.block_until_ready(leaves)
    dt = time.perf_counter() - t0
    return {
        "variant": variant,
        "load_s": dt,
        "loadavg_1min": load1,
        "rss_base": base,
        "rss_peak": _status("VmHWM") if ok else None,
        "rss_final": _status("VmRSS"),
        "model_bytes": int(sum(x.nbytes for x in leaves)),
        "peak_reset": ok,
        "backend": jax.default_backend(),
    }


def child_profile(folder: Path) -> dict:
    """Where the load time goes, stage by stage over all tensors (warm cache).

    read: into one reused (already faulted) staging buffer vs into fresh buffers; place: the transposing
    placement of every Linear weight from a staging buffer, by PJRT's transposing device_put (``host``)
    and by a jitted XLA transpose of the as-stored array (``device``, compile excluded, timed apart).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from converters import engine
    from converters.zimage import read_config, zimage_key_table

    jnp.zeros(1).block_until_ready()
    table = zimage_key_table(read_config(folder))
    reader = engine.SafetensorsReader(folder)
    infos = reader.infos
    nbytes = sum(i.end - i.start for i in infos.values())
    stage = engine.aligned_empty((max(i.end - i.start for i in infos.values()),), np.uint8)

    def view(k: str) -> np.ndarray:
        i = infos[k]
        dt = engine.ST_TO_NP[i.dtype]
        return stage[: i.end - i.start].view(dt).reshape(i.shape)

    t0 = time.perf_counter()
    for k in infos:
        reader.read(k, out=view(k))
    read_staged = time.perf_counter() - t0
    t0 = time.perf_counter()
    fresh = [reader.read(k) for k in infos]
    read_fresh = time.perf_counter() - t0
    del fresh
    lin = [e.torch_keys[0] for e in table.entries if e.to_flax is engine._transpose]
    lin_bytes = sum(infos[k].end - infos[k].start for k in lin)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def xla_transpose(a: np.ndarray) -> Any:  # the engine's device path: compiled once per shape
        return engine._precompile(engine._place_key(a.shape, a.dtype, a.dtype, True, dev)).result()

    t0 = time.perf_counter()
    for k in {(infos[k].shape, infos[k].dtype): k for k in lin}.values():
        xla_transpose(view(k))
    compile_s = time.perf_counter() - t0
    out = {}
    for mode in ("host", "device", "host", "device"):  # alternated, best of 2
        keep = []
        t0 = time.perf_counter()
        for k in lin:
            reader.read(k, out=view(k))
            a = view(k)
            y = jax.device_put(a.T) if mode == "host" else xla_transpose(a)(jax.device_put(a, dev))
            keep.append(y.block_until_ready())
        dt = time.perf_counter() - t0 - read_staged * lin_bytes / nbytes
        out[mode] = min(out.get(mode, 1e9), dt)
        del keep
    return {
        "read_staged_s": read_staged,
        "read_fresh_s": read_fresh,
        "linear_bytes": lin_bytes,
        "place_host_transpose_s": out["host"],
        "place_device_transpose_s": out["device"],
        "device_compile_s": compile_s,
        "distinct_linear_shapes": len({infos[k].shape for k in lin}),
    }


def child_save(folder: Path, dest: Path) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from converters.zimage import load_zimage, save_zimage

    model = load_zimage(folder, dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    shutil.rmtree(dest, ignore_errors=True)
    base = _status("VmRSS")
    ok = _reset_peak()
    t0 = time.perf_counter()
    save_zimage(model, dest, max_shard_bytes=int(os.environ.get("BENCH_SHARD_BYTES", 5 * 1024**3)))
    dt = time.perf_counter() - t0
    peak = _status("VmHWM") if ok else None
    t0 = time.perf_counter()
    os.sync()
    return {
        "save_s": dt,
        "sync_s": time.perf_counter() - t0,
        "rss_base": base,
        "rss_peak": peak,
        "rss_final": _status("VmRSS"),
    }


def child_raw_write(dest: Path, nbytes: int) -> dict:
    """Reference for save: write nbytes from one 64 MiB buffer (page cache), then sync."""
    import numpy as np

    buf = np.random.default_rng(0).integers(0, 255, 64 * 2**20, np.uint8)
    dest.mkdir(parents=True, exist_ok=True)
    f = dest / "raw.bin"
    t0 = time.perf_counter()
    with open(f, "wb") as fh:
        left = nbytes
        while left > 0:
            n = min(left, buf.nbytes)
            fh.write(buf[:n].data)
            left -= n
    dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    os.sync()
    out = {"write_s": dt, "sync_s": time.perf_counter() - t0}
    f.unlink()
    return out


def run_child(*argv: str, code_root: Path | None = None) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    if code_root is not None:
        env["BENCH_CODE_ROOT"] = str(code_root)
    p = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"child {argv} failed (rc={p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][7:])


def cat_time(files: list[Path]) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=REPO / "bench-out" / "converter")
    ap.add_argument("--layers", type=int, default=4, help="main blocks kept (refiners: all 2+2)")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="max shard size of the synthetic checkpoint")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of cat / load (best is reported)")
    ap.add_argument("--rewrite", action="store_true", help="rewrite the synthetic checkpoint")
    ap.add_argument("--no-cold", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the saved copy")
    ap.add_argument(
        "--variants",
        default="old,auto,device",
        help="loads to compare, alternated in every repeat: 'old' (load_zimage of --old-ref) and/or "
        "transpose_on modes of the current engine (auto, host, device, legacy)",
    )
    ap.add_argument("--old-ref", default="8a6228e~1", help="git revision whose converters/ + tmp_jax/ are 'old'")
    ap.add_argument("--no-save", action="store_true", help="skip the save measurement")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        kind, *rest = args.child
        if kind == "load":
            res = child_load(Path(rest[0]), rest[1] == "cold", rest[2])
        elif kind == "profile":
            res = child_profile(Path(rest[0]))
        elif kind == "save":
            res = child_save(Path(rest[0]), Path(rest[1]))
        else:
            res = child_raw_write(Path(rest[0]), int(rest[1]))
        print("RESULT " + json.dumps(res), flush=True)
        return

    import numpy as np

    from converters.engine import SafetensorsReader

    start = time.perf_counter()
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / f"zimage-{args.layers}L-{args.dtype}"
    cfg = bench_config(args.layers)
    from converters.zimage import zimage_key_table

    n_params = zimage_key_table(cfg).num_params()
    est = n_params * (2 if args.dtype == "bf16" else 4)
    free = shutil.disk_usage(out).free
    print(f"checkpoint: {n_params / 1e9:.3f}B params, {est / GB:.2f} GB {args.dtype}; free disk {free / GB:.1f} GB")
    if free < 3 * est + 2 * GB:
        sys.exit(f"not enough free disk under {out}: need ~{(3 * est + 2 * GB) / GB:.1f} GB")
    if args.rewrite or not (ckpt / "config.json").is_file():
        t0 = time.perf_counter()
        write_synthetic(ckpt, args.layers, args.dtype, int(args.shard_gb * 1024**3))
        print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f}s")
    files = shards(ckpt)
    reader = SafetensorsReader(ckpt)
    tensor_bytes = reader.total_bytes()
    file_bytes = sum(f.stat().st_size for f in files)
    largest = max(i.end - i.start for i in reader.infos.values())
    res: dict = {
        "config": {"dim": cfg.dim, "layers_kept": list(cfg.layers_kept), "refiners": cfg.n_refiner_layers},
        "dtype": args.dtype,
        "files": len(files),
        "file_bytes": file_bytes,
        "tensor_bytes": tensor_bytes,
        "tensors": len(reader.infos),
        "largest_tensor_bytes": largest,
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    print(
        f"{len(files)} shards, {len(reader.infos)} tensors, {file_bytes / GB:.2f} GB, largest tensor "
        f"{largest / 1e6:.1f} MB"
    )

    variants = args.variants.split(",")
    roots: dict[str, Path | None] = {v: None for v in variants}
    if "old" in variants:  # the old engine + model code, extracted read-only from git
        old_root = out / "old-code"
        shutil.rmtree(old_root, ignore_errors=True)
        old_root.mkdir(parents=True)
        tar = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.old_ref, "converters", "tmp_jax"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old_root)], input=tar, check=True)
        roots["old"] = old_root
        res["old_ref"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", args.old_ref], capture_output=True, text=True
        ).stdout.strip()
    res["variants"] = variants

    def series(cold: bool) -> tuple[list[float], dict[str, list[dict]]]:
        """Repeats of [cat, then every variant's load], alternated so each sees the same machine state."""
        cats: list[float] = []
        loads: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):
            if cold:
                evict(files)
            cats.append(cat_time(files))
            for v in variants:
                loads[v].append(run_child("load", str(ckpt), "cold" if cold else "warm", v, code_root=roots[v]))
        return cats, loads

    # warm: every file read once, then cat and load from the page cache
    cat_time(files)
    res["cat_warm_all"], res["loads_warm"] = series(False)
    res["profile_warm"] = run_child("profile", str(ckpt))
    if not args.no_cold:
        res["cat_cold_all"], res["loads_cold"] = series(True)
    dest = out / "saved"
    if not args.no_save:
        res["save"] = run_child("save", str(ckpt), str(dest))
        res["raw_write"] = run_child("raw_write", str(out / "rawwrite"), str(file_bytes))
        # the saved copy must be byte-identical in tensor content (same keys, same bytes)
        r2 = SafetensorsReader(dest)
        same = set(r2.keys()) == set(reader.keys()) and all(
            np.array_equal(r2.read(k).view(np.uint8), reader.read(k).view(np.uint8)) for k in list(reader.keys())[:40]
        )
        res["save_roundtrip_first40_identical"] = bool(same)
        if not args.keep:
            shutil.rmtree(dest, ignore_errors=True)
    res["loadavg_end"] = os.getloadavg()
    res["bench_s"] = time.perf_counter() - start

    # ---- report ------------------------------------------------------------------------------
    def gbps(nbytes: int, s: float) -> str:
        return f"{nbytes / s / GB:.2f}"

    target_rss = 2 * largest + 0.5 * 2**30
    rows = [
        "| measurement | cache | best s | all runs (s) | GB/s (best) | vs raw read (best) |",
        "|---|---|---|---|---|---|",
    ]
    caches = [("warm", "cat_warm_all", "loads_warm")]
    if not args.no_cold:
        caches.append(("cold (fadvise)", "cat_cold_all", "loads_cold"))
    best: dict[tuple[str, str], dict] = {}
    for cname, ckey, lkey in caches:
        cats = res[ckey]
        c = min(cats)
        runs = " ".join(f"{x:.2f}" for x in cats)
        rows.append(f"| cat shards > /dev/null | {cname} | {c:.2f} | {runs} | {gbps(file_bytes, c)} | 100% |")
        for v in variants:
            lr = res[lkey][v]
            b_ = min(lr, key=lambda r: r["load_s"])
            best[(cname, v)] = b_
            t = b_["load_s"]
            runs = " ".join(f"{r['load_s']:.2f}" for r in lr)
            rows.append(
                f"| load {v} (bf16) | {cname} | {t:.2f} | {runs} | {gbps(tensor_bytes, t)} | "
                f"{100 * (tensor_bytes / t) / (file_bytes / c):.0f}% |"
            )
    if "save" in res:
        sv, rw = res["save"], res["raw_write"]
        rows.append(
            f"| raw write 64 MiB chunks (page cache) | - | {rw['write_s']:.2f} | | "
            f"{gbps(file_bytes, rw['write_s'])} | (write ref) |"
        )
        rows.append(
            f"| save_zimage (page cache) | - | {sv['save_s']:.2f} | | {gbps(tensor_bytes, sv['save_s'])} | "
            f"{100 * rw['write_s'] / sv['save_s']:.0f}% of raw write |"
        )
        rows.append(f"| sync after save | - | {sv['sync_s']:.2f} | | | |")
    pw = res["profile_warm"]
    lb = pw["linear_bytes"]
    rows.append("")
    rows.append(
        f"load stages (warm): read into one reused staging buffer {pw['read_staged_s']:.2f}s "
        f"({gbps(tensor_bytes, pw['read_staged_s'])} GB/s), into fresh buffers {pw['read_fresh_s']:.2f}s "
        f"({gbps(tensor_bytes, pw['read_fresh_s'])} GB/s); transposing placement of the Linear weights "
        f"({lb / GB:.2f} GB) from staging: PJRT device_put of the view {pw['place_host_transpose_s']:.2f}s "
        f"({gbps(lb, pw['place_host_transpose_s'])} GB/s), jitted XLA transpose {pw['place_device_transpose_s']:.2f}s "
        f"({gbps(lb, pw['place_device_transpose_s'])} GB/s) + compile {pw['device_compile_s']:.2f}s for "
        f"{pw['distinct_linear_shapes']} shapes"
    )
    mem = [
        "| RSS (MB) | base | peak | final | peak - final (transient) | peak - base - model | target |",
        "|---|---|---|---|---|---|---|",
    ]
    mrows = [(f"load {v}, {c}", r) for (c, v), r in best.items()]
    if "save" in res:
        mrows.append(("save", res["save"]))
    for name, r in mrows:
        if not r or r.get("rss_peak") is None:
            continue
        model = r.get("model_bytes", 0)
        tr = r["rss_peak"] - r["rss_final"] if name != "save" else r["rss_peak"] - r["rss_base"]
        extra = f"{(r['rss_peak'] - r['rss_base'] - model) / 1e6:.0f}" if name != "save" else "-"
        mem.append(
            f"| {name} | {r['rss_base'] / 1e6:.0f} | {r['rss_peak'] / 1e6:.0f} | {r['rss_final'] / 1e6:.0f} | "
            f"{tr / 1e6:.0f} | {extra} | <= {target_rss / 1e6:.0f} |"
        )
    la = [r["loadavg_1min"] for k in ("loads_warm", "loads_cold") for v in variants for r in res.get(k, {}).get(v, [])]
    mem.append("")
    mem.append(
        f"1-min load average during the loads: {min(la):.1f}-{max(la):.1f} on {os.cpu_count()} CPUs "
        f"(start {res['loadavg_start'][0]:.1f}, end {res['loadavg_end'][0]:.1f})"
    )
    text = "\n".join(rows + [""] + mem)
    print(text)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "table.md").write_text(text + "\n")
    print(f"bench took {res['bench_s']:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
