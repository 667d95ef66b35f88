"""Export a plan's winning subnetwork as PyTorch safetensors that standard loaders read.

    python -m converters.export --plan OUT/plan.json --model SRC --out pruned/ [--dtype bf16|fp32]
        [--quantize none|int8|fp8] [--target-memory 24GB --resolution 1024]

Streams: for every tensor of the pruned model, the source tensors of the matching key-table entry
are read (one entry at a time), converted to our layout by the entry's hook, sliced by the plan's
kept unit indices (ORIGINAL numbering), converted back, and written straight to a sharded
safetensors file in a temp folder that is renamed into place only at the end. Peak host memory is
bounded by one table entry, never the whole model. Re-running gives byte-identical files.

Z-Image: depth-only or uniform plans (equal refiner depths) become a stock
``ZImageTransformer2DModel`` config; anything heterogeneous is written with our small diffusers
subclass next to config.json (``auto_map``), loadable by
``AutoModel.from_pretrained(folder, trust_remote_code=True)``.

HunyuanImage-3.0: the OFFICIAL layout (``model*.safetensors`` + ``model.safetensors.index.json``). config.json
is the source's with ``num_hidden_layers``, the per-layer lists ``num_experts`` / ``moe_topk`` /
``moe_intermediate_size`` / ``num_shared_expert`` and the global ``num_attention_heads`` /
``num_key_value_heads`` lowered, plus ``layers_kept`` (ORIGINAL layer indices, informative; the official
code ignores it); everything else (``auto_map``, ``rope_scaling``, token ids, VAE / ViT settings) is kept.
Decoder layers are renumbered contiguously, router rows follow the kept experts, and the VAE / vision
tensors are copied unchanged, as is every non-weight file of the source folder (tokenizer,
generation_config.json, the remote-code ``*.py``, sub-folders).

``--quantize int8|fp8`` stores the Linear weights of the repeated blocks weight-only quantised with per-output-
channel fp32 scales (:mod:`converters.quantize`, docs/quantized-format.md) and adds a ``quantization_config``
block to config.json; such a folder is read by ``python -m converters.run_torch`` (stock loaders refuse the
unknown ``quant_method``). ``--target-memory 24GB`` also writes ``memory_plan.json`` (what stays on the GPU,
which experts are offloaded; :mod:`converters.memory_plan`) and fails, writing nothing, if it cannot fit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from converters import registry
from converters.engine import (
    NP_TO_ST,
    ST_TO_NP,
    AtomicDir,
    CheckpointError,
    PlannedTensor,
    SafetensorsReader,
    StreamingWriter,
    write_json,
)
from tmp_jax import arch
from tmp_jax.materialize import take_kept
from tmp_jax.tree import Assignment, Tree

DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16)}


@dataclass
class ExportConfig:
    plan: Path
    model: Path
    out: Path
    dtype: str | None = None
    weights: Path | None = None
    overwrite: bool = False
    max_shard_bytes: int = 5 * 1024**3
    progress: bool = True
    quantize: str = "none"
    target_memory: str | None = None
    resolution: int = 1024
    compensate: bool = True  # re-fit the kept consumers as the plan's search did (plans that record it)


# source-folder entries that are never copied next to the pruned weights: the unpruned weights themselves
# (any format) and config.json, which the exporter rewrites
_WEIGHT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model*.bin.index.json",
    "config.json",
)
TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}  # --dtype -> config.json


def copy_extra_files(src: Path, dst: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Copy every entry of ``src`` that is not a weight file or config.json (tokenizer files,
    generation_config.json, remote-code ``*.py``, sub-folders) into ``dst``, contents byte for byte
    (symlinks followed, as in a Hugging Face cache snapshot). Hidden entries (``.cache``, ``.git``, a
    temporary export folder) and the ``skip`` paths are left out. Returns the copied names, sorted."""
    skip_resolved = {p.resolve() for p in skip}
    copied = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or any(p.match(pat) for pat in _WEIGHT_PATTERNS) or p.resolve() in skip_resolved:
            continue
        if p.is_dir():
            shutil.copytree(p, dst / p.name, symlinks=False)
        else:
            shutil.copyfile(p, dst / p.name)
        copied.append(p.name)
    return copied


def kept_slices(tree: Tree, plan: dict[str, Any]) -> dict[tuple, list[tuple[int, np.ndarray]]]:
    """Source parameter path -> [(axis, element indices)] from the plan's ORIGINAL-numbered unit ids (one list
    per expert for per-expert groups): :func:`tmp_jax.materialize.slice_plan` of the plan's kept-first order,
    applied with :func:`tmp_jax.materialize.take_kept`."""
    from tmp_jax.materialize import kept_first_order, slice_plan
    from tmp_jax.plan import plan_assignment

    a = plan_assignment(plan)
    kept = plan["policy"]["kept_units"]
    for n in tree.spec.nodes():
        if n.name not in a.dropped:
            for u in n.units:
                if f"{n.name}/{u.kind}" not in kept:
                    raise CheckpointError(f"plan: no kept_units for {n.name}/{u.kind}")
    try:
        order = kept_first_order(tree, kept)
    except ValueError as e:
        raise CheckpointError(f"plan: {e}") from None
    for node, kind in order:  # the lists must hold exactly the plan's kept counts
        got, k = np.shape(kept[f"{node}/{kind}"])[-1], tree.kept_count(a, node, kind)
        if node not in a.dropped and got != k:
            raise CheckpointError(f"plan: kept_units for {node}/{kind} lists {got} units, its keep is {k}")
    return slice_plan(tree, a, order)


class PrunedSource:
    """The pruned model's parameters, one at a time, in our (NNX) layout at the PRUNED paths, streamed from the
    source checkpoint: each read converts one source key-table entry (the last one is cached), slices it by the
    plan's kept units and, for a compensated plan, re-fits the kept consumer rows first; with ``weights``
    (recovered weights, already the pruned shapes) the entries of that checkpoint are read instead.

    Construction checks everything a run needs before any tensor is read (one-line :class:`CheckpointError`):
    the plan, the source fingerprint, the compensation file, and that every needed key exists. Used by
    :func:`export` and by the streamed reconstruction (:mod:`tmp_jax.reconstruct`)."""

    def __init__(self, plan_path: Path, model: Path, *, compensate: bool = True, weights: Path | None = None):
        from tmp_jax.fileio import fingerprint
        from tmp_jax.plan import load_plan, plan_assignment

        plan = load_plan(plan_path)
        name = plan["arch"]
        self.plan, self.name = plan, name
        self.conv = registry.find(name)  # the arch's export layout (converters/NAME.py)
        hooks = arch.get(name) if self.conv is not None else None  # key table, config reader, weights prefix
        if hooks is None or hooks.read_config is None or hooks.key_table is None:
            raise CheckpointError(f"{plan_path}: export of arch {name!r} is not supported yet")
        self.hooks = hooks
        self.src_cfg = src_cfg = hooks.read_config(model)
        self.src_reader = SafetensorsReader(model)  # strict: missing shards / truncation fail here, first
        fp = fingerprint(model, src_cfg.to_hf_config())
        want = plan.get("source", {}).get("fingerprint")
        if want != fp:
            raise CheckpointError(
                f"{model}: checkpoint fingerprint {fp[:23]}... does not match the plan's source "
                f"{str(want)[:23]}... (the plan was made from another model)"
            )
        self.tree = tree = Tree(hooks.build_spec(src_cfg))
        a: Assignment = plan_assignment(plan)
        self.new_cfg = new_cfg = hooks.pruned_config(src_cfg, tree, a)
        self.src_table, self.new_table = hooks.key_table(src_cfg), hooks.key_table(new_cfg)
        self.by_path = {p: e for e in self.src_table.entries for p in e.flax_paths}
        self.new_by_path = {p: e for e in self.new_table.entries for p in e.flax_paths}
        self.pmap = hooks.path_map(src_cfg, new_cfg)
        self.slices = kept_slices(tree, plan)
        # compensated plans: the kept consumer rows are re-fitted from the source weights and the plan's Grams
        # (recovered --weights are final already)
        self.comp = None
        if compensate and weights is None:
            from tmp_jax.compensate import from_plan

            try:
                self.comp = from_plan(plan, plan_path)
            except ValueError as e:
                raise CheckpointError(str(e)) from None
        self.consumers = self.comp.consumers(tree) if self.comp is not None else {}
        # a plan from before per-expert orders lists one set for every expert: the re-fit takes it per row too
        self.kept_ids = {
            tuple(k.rsplit("/", 1)): np.asarray(v, np.int64) for k, v in plan["policy"]["kept_units"].items()
        }
        self.weights = weights
        self.reader = SafetensorsReader(weights) if weights is not None else self.src_reader
        read_table = self.new_table if weights is not None else self.src_table
        missing = [k for e in read_table.entries for k in e.torch_keys if k not in self.reader]
        if missing:
            raise CheckpointError(f"{self.reader.root}: missing key {missing[0]!r} needed by the export")
        self._cache: dict[int, list[np.ndarray]] = {}

    def array(self, p_new: tuple) -> np.ndarray:
        """The pruned model's parameter at path ``p_new`` (our layout, the stored dtype)."""
        if self.weights is not None:
            e = self.new_by_path[p_new]
            arrs = e.to_flax([self.reader.read(k) for k in e.torch_keys])
            return arrs[e.flax_paths.index(p_new)]
        p_src = self.pmap(p_new)
        e = self.by_path[p_src]
        if id(e) not in self._cache:
            self._cache.clear()  # one source entry at a time bounds memory
            self._cache[id(e)] = e.to_flax([self.reader.read(k) for k in e.torch_keys])
        arr = self._cache[id(e)][e.flax_paths.index(p_src)]
        skip = None
        if p_src in self.consumers:  # re-fit on the full consumer, then slice its other axes
            node, kind, _, s = self.consumers[p_src]
            arr = self.comp.apply(self.tree, p_src, arr, self.kept_ids[(node, kind)]).astype(arr.dtype)
            skip = s.axis
        return take_kept(arr, self.slices.get(p_src, []), skip)

    def entry_dtype(self, e: Any) -> np.dtype:
        """Output dtype of a pruned key-table entry = that of the tensor it is read or sliced from."""
        return _entry_dtype(self.reader, e, self.by_path, self.pmap, self.weights is not None)


def export(cfg: ExportConfig, overrides: Callable[[tuple], np.ndarray | None] | None = None) -> dict[str, Any]:
    """Write the plan's pruned model (see the module doc); returns a summary.

    ``overrides``: pruned parameter path -> an array (our layout, any float dtype, cast to the output's) that
    replaces the sliced one, or None to slice it: the streamed reconstruction writes its fitted blocks this way."""
    from converters import quantize as qz

    qz.check_method(cfg.quantize)
    target_bytes = None
    if cfg.target_memory is not None:
        from converters.memory_plan import check_resolution, parse_bytes

        target_bytes = parse_bytes(cfg.target_memory)
        check_resolution(cfg.resolution)  # before any tensor is streamed, not after
    src = PrunedSource(cfg.plan, cfg.model, compensate=cfg.compensate, weights=cfg.weights)
    plan, name, hooks, src_reader = src.plan, src.name, src.hooks, src.src_reader
    src_cfg, new_cfg, src_table, new_table = src.src_cfg, src.new_cfg, src.src_table, src.new_table
    comp = src.comp
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None

    def src_array(p_new: tuple) -> np.ndarray:
        x = overrides(p_new) if overrides is not None else None
        return src.array(p_new) if x is None else x

    # plan every output tensor (shape, dtype) before writing, so headers are written up front
    # a quantised weight is followed by its fp32 per-output-channel scale
    planned: list[PlannedTensor] = []
    quantized: list[str] = []
    for e in new_table.entries:
        src_dt = src.entry_dtype(e)
        dt = out_dtype if out_dtype is not None else src_dt
        for k, s in zip(e.torch_keys, e.torch_shapes):
            if cfg.quantize != "none" and qz.quantizable(name, k, tuple(s)):
                planned.append(PlannedTensor(k, tuple(s), qz.TAGS[cfg.quantize]))
                planned.append(PlannedTensor(qz.scale_key(k), (s[0],), "F32"))
                quantized.append(k)
            else:
                planned.append(PlannedTensor(k, tuple(s), NP_TO_ST[dt]))
    tag_of = {pt.key: pt.tag for pt in planned}
    # carried-through tensors (e.g. a VAE) always come from the source checkpoint, byte for byte
    passthrough = [k for k in src_reader.keys() if src_table.is_passthrough(k)]
    planned += [PlannedTensor(k, src_reader.infos[k].shape, src_reader.infos[k].dtype) for k in passthrough]

    from tmp_jax.progress import progress_bar  # live on a terminal, a line every few seconds in a log

    pbar = progress_bar(total=len(planned) - len(quantized), desc="export", unit="tensor", disable=not cfg.progress)
    with AtomicDir(cfg.out, overwrite=cfg.overwrite) as tmp:
        writer = StreamingWriter(tmp, planned, prefix=hooks.weights_prefix, max_shard_bytes=cfg.max_shard_bytes)
        for e in new_table.entries:
            arrays = [src_array(p) for p in e.flax_paths]
            for key, arr in zip(e.torch_keys, e.to_torch(arrays)):
                if tag_of[key] in ("I8", "F8_E4M3"):  # quantised from the source values (before any --dtype cast)
                    q, scale = qz.quantize(np.ascontiguousarray(arr), cfg.quantize)
                    writer.write(key, q)
                    writer.write(qz.scale_key(key), scale)
                    del q, scale
                else:
                    writer.write(key, np.ascontiguousarray(arr).astype(DTYPES_BY_TAG[tag_of[key]], copy=False))
                pbar.update(1)
        for k in passthrough:
            writer.write(k, src_reader.read(k))
            pbar.update(1)
        files = writer.finish()
        layout = src.conv.write_export_config(src_cfg, new_cfg, tmp, cfg)
        if quantized:
            _add_config_block(tmp / "config.json", qz.quantization_config(cfg.quantize, name, quantized))
            layout += f", {cfg.quantize} weight-only ({len(quantized)} tensors)"
        memory = None
        if target_bytes is not None:
            from converters.memory_plan import make_plan

            memory = make_plan(tmp, target_bytes, resolution=cfg.resolution)  # raises (nothing written) if no fit
            write_json(tmp / "memory_plan.json", memory)
        size = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())  # copied sub-folders too
    pbar.close()
    return {
        "out": str(cfg.out),
        "layout": layout,
        "params_before": src_table.num_params(),
        "params_after": new_table.num_params(),
        "plan_params_after": plan["counts"]["after"]["params"],
        "files": files,
        "bytes": size,
        "quantized": len(quantized),
        "memory_plan": memory,
        "compensated": comp is not None,
    }


def _add_config_block(path: Path, block: dict[str, Any]) -> None:
    """Add ``quantization_config`` to a written config.json, keeping its key order (last key)."""
    conf = json.loads(path.read_text())
    conf["quantization_config"] = block
    path.write_text(json.dumps(conf, indent=2) + "\n")


DTYPES_BY_TAG = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
}


def _entry_dtype(reader: SafetensorsReader, e: Any, by_path: dict, pmap: Any, recovered: bool) -> Any:
    """Output dtype of an entry = that of the source tensor it is sliced from."""
    key = e.torch_keys[0] if recovered else by_path[pmap(e.flax_paths[0])].torch_keys[0]
    return ST_TO_NP[reader.infos[key].dtype]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m converters.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--plan", required=True, type=Path, help="plan.json written by python -m tmp_jax.search")
    p.add_argument(
        "--model",
        required=True,
        help="the ORIGINAL checkpoint folder the plan was made from, or an embedded name "
        f"({', '.join(arch.embedded_teachers())})",
    )
    p.add_argument("--weights", type=Path, help="recovered (distilled) weights to export instead of slicing SRC")
    p.add_argument("--out", type=Path, default=Path("pruned"), help="output folder (default: pruned)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating tensors (default: keep the source dtype)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--max-shard-size", type=float, default=5.0, help="GB per safetensors shard (default 5)")
    p.add_argument(
        "--quantize",
        default="none",
        help="weight-only quantisation of the block Linear weights: none (default), int8 or fp8 "
        "(per-output-channel scales; docs/quantized-format.md)",
    )
    p.add_argument(
        "--target-memory",
        help="write memory_plan.json for inference within this GPU memory (e.g. 24GB = 24e9 B, 24GiB); fails if "
        "the export cannot fit",
    )
    p.add_argument("--resolution", type=int, default=1024, help="image side (px) the memory plan assumes (1024)")
    p.add_argument(
        "--compensate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-fit the kept consumer weights (to_out / w2 / o_proj / down_proj) by least squares from the "
        "Grams the search saved next to a compensated plan, as the search evaluated them (default); "
        "--no-compensate slices only (ablation). Ignored with --weights and for plans made with --no-compensate",
    )
    args = p.parse_args(argv)
    from tmp_jax.evaluate import resolve  # the embedded names search / distill / evaluate accept -> folders

    try:
        model = resolve(args.model)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = ExportConfig(
        plan=args.plan,
        model=model,
        out=args.out,
        dtype=args.dtype,
        weights=args.weights,
        overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_size * 1e9),
        quantize=args.quantize,
        target_memory=args.target_memory,
        resolution=args.resolution,
        compensate=args.compensate,
    )
    try:
        res = export(cfg)
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"exported {res['params_after']:,} of {res['params_before']:,} parameters "
        f"({res['bytes'] / 1e6:.1f} MB in {len(res['files'])} file(s)) to {res['out']} as {res['layout']}"
    )
    if res["memory_plan"] is not None:
        m = res["memory_plan"]
        print(
            f"memory plan: estimated peak {m['estimate']['peak_bytes'] / 2**30:.2f} GiB of "
            f"{m['target_bytes'] / 2**30:.2f} GiB; {m['summary']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
