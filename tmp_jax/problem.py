"""The search problem: a teacher, its pruning tree, cached calibration outputs, and a fitness.

Fitness of a genome = normalised discrepancy between the candidate's denoiser output and the cached
teacher output over calibration micro-batches: ``sum ||y - y_T||^2 / sum ||y_T||^2`` over the
output tokens that matter (image tokens), minimised. Candidates are evaluated with their own pruned
widths: the teacher is permuted once into importance order, so every candidate is a set of prefix
slices. Evaluation runs the permuted teacher's FULL parameters through per-sub-layer jitted functions that
slice those prefixes inside the jit (``hooks.forward_pruned``), each compiled once per (sub-layer kind,
width level): no model is built per candidate, and after warm-up nothing compiles.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import arch
from tmp_jax.calibration import Calibration, calibrate, importance, load_calib, order_from_scores
from tmp_jax.materialize import materialize, permute
from tmp_jax.tree import Tree

ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED = {"zimage-fmnist": ASSETS / "zimage-fmnist", "hunyuan-fmnist": ASSETS / "hunyuan-fmnist"}


def fingerprint(path: str | Path | None, config: dict[str, Any]) -> str:
    """sha256 over config.json and every safetensors header + file size (cheap, content-sensitive
    enough to tell checkpoints apart without reading 100+ GB)."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    if path is not None:
        p = Path(path)
        files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
        for f in files:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                h.update(f.name.encode() + fh.read(n) + str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()


class PruningProblem:
    def __init__(self, model: Any, calib: Calibration, *, source: dict[str, Any], levels: dict | None = None):
        self.arch = model.ARCH
        self.hooks = arch.get(self.arch)
        self.tree = Tree(self.hooks.build_spec(model.config), levels)
        self.importance, self.block_scores = importance(self.tree, calib.stats)
        self.order = order_from_scores(self.importance)
        self.source = source
        self.teacher_model = model
        # permute once: every kept set becomes a prefix (function-preserving)
        self.model = permute(nnx.clone(model), self.tree, self.order)
        self.calib = calib
        self.n_evals = 0

    def warmup(self) -> int:
        """Compile every (stream, sub-layer, width level) variant once: afterwards evaluating any
        candidate compiles nothing. Returns the number of compiled variants."""
        mx = self.tree.max_levels()
        keep = np.array([g.kind == "keep" for g in self.tree.genes])
        for lvl in range(int(mx.max()) + 1):
            g = np.where(keep, mx, np.minimum(lvl, mx))
            self.fitness(g[None])
        self.n_evals -= int(mx.max()) + 1  # warm-up evaluations are not search evaluations
        return self.compile_count()

    def n_samples_total(self) -> int:
        return sum(int(t.shape[0]) for t in self.calib.teacher)

    def compile_count(self) -> int:
        return self.hooks.compile_count()

    def candidate(self, genome: np.ndarray) -> Any:
        return materialize(self.model, self.tree, self.tree.decode(genome), None)

    def fitness(self, genomes: np.ndarray, n_samples: int | None = None) -> np.ndarray:
        """Normalised output error of each genome's candidate on the first ``n_samples`` calibration samples.

        Candidates are evaluated on the permuted teacher itself (``hooks.forward_pruned``: prefixes sliced
        inside the per-sub-layer jitted functions), so nothing is materialised per candidate; an architecture
        without that hook falls back to materialising each candidate."""
        genomes = np.atleast_2d(np.asarray(genomes))
        out = np.zeros(len(genomes))
        for i, g in enumerate(genomes):
            a = self.tree.decode(g)
            if self.hooks.forward_pruned is not None:
                run = lambda inputs, a=a: self.hooks.forward_pruned(self.model, self.tree, a, inputs)  # noqa: E731
            else:
                m = materialize(self.model, self.tree, a, None)
                run = lambda inputs, m=m: self.hooks.forward(m, inputs)  # noqa: E731
            out[i] = self._error(run, n_samples)
            self.n_evals += 1
        return out

    def fitness_materialized(self, genomes: np.ndarray, n_samples: int | None = None) -> np.ndarray:
        """:meth:`fitness` through a materialised candidate per genome (the reference the fast path is
        tested against; slow: builds and slices a model per genome). Does not count as search evaluations."""
        genomes = np.atleast_2d(np.asarray(genomes))
        out = np.zeros(len(genomes))
        for i, g in enumerate(genomes):
            m = self.candidate(g)
            out[i] = self._error(lambda inputs, m=m: self.hooks.forward(m, inputs), n_samples)
        return out

    def _error(self, run: Any, n_samples: int | None) -> float:
        """``sum ||y - y_T||^2 / sum ||y_T||^2`` over the masked output of the first ``n_samples`` samples."""
        num = den = 0.0
        seen = 0
        for inputs, yt in zip(self.calib.inputs, self.calib.teacher):
            if n_samples is not None and seen >= n_samples:
                break
            y = np.asarray(run(inputs), np.float64)
            mask = np.asarray(inputs["mask"])[..., None]
            num += float(np.sum(np.square(y - yt) * mask))
            den += float(np.sum(np.square(yt.astype(np.float64)) * mask))
            seen += int(yt.shape[0])
        return num / max(den, 1e-30)


def build_problem(
    model: str | None = None,
    calib: str | None = None,
    mesh: str | None = None,
    seed: int = 0,
    progress: bool = False,
    n_synthetic: int = 8,
    out: str | Path | None = None,
) -> PruningProblem:
    """Load the teacher (a checkpoint folder, an embedded name, or the default) and calibrate it."""
    from tmp_jax.sharding import make_mesh, shard_module

    m_obj, path, name = _load_model(model)
    cfg_dict = m_obj.config.to_hf_config()
    source = {
        "path": str(path) if path else name,
        "fingerprint": fingerprint(path, cfg_dict),
        "config": cfg_dict,
    }
    hooks = arch.get(m_obj.ARCH)
    if calib is not None:
        batches = load_calib(calib, m_obj.ARCH)
    else:
        emb = _embedded_calib(m_obj.ARCH, path, m_obj.config)
        if emb is not None:
            batches = emb
        else:
            warnings.warn(
                "no --calib given: using a synthetic calibration set matching the model's inputs; "
                "real data gives better plans",
                stacklevel=2,
            )
            batches = hooks.synthetic_calib(m_obj.config, n_synthetic, 4, seed)
    msh = make_mesh(mesh) if mesh else None
    if msh is not None:
        shard_module(m_obj, msh)
    cal = calibrate(m_obj, batches, mesh=msh, out=out, progress=progress)
    return PruningProblem(m_obj, cal, source=source)


def load_tree(model: str | None) -> Tree:
    """The pruning tree of ``model`` from its config.json alone (fast budget checks before loading)."""
    if model is None:
        model = "zimage-fmnist"
    p = EMBEDDED.get(model, Path(model))
    conf = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not conf.is_file():
        if model == "zimage-fmnist":  # built-in tiny fallback (see _load_model)
            from tmp_jax.models.z_image import TINY

            return Tree(arch.get("zimage").build_spec(TINY))
        raise ValueError(f"--model {model}: no config.json (expected a HF/diffusers checkpoint folder)")
    cfg_d = json.loads(conf.read_text())
    hooks = arch.detect(cfg_d)
    return Tree(hooks.build_spec(hooks.config_from_dict(cfg_d)))


def _load_model(model: str | None) -> tuple[Any, Path | None, str]:
    if model is None:
        model = "zimage-fmnist"
    if model in EMBEDDED:
        p = EMBEDDED[model]
        if (p / "config.json").is_file():
            cfg = json.loads((p / "config.json").read_text())
            return arch.detect(cfg).load(str(p), dtype=jnp.float32), p, model
        if model != "zimage-fmnist":
            raise ValueError(f"embedded model {model!r} is not available in this installation ({p})")
        # until the embedded teacher is trained: a tiny built-in random Z-Image
        from tmp_jax.models.z_image import TINY

        print("embedded teacher not found: using the tiny built-in random Z-Image", file=sys.stderr)
        return arch.get("zimage").init_random(TINY, jnp.float32, 0), None, "zimage-tiny-random"
    p = Path(model)
    conf = p / "config.json" if p.is_dir() else p.parent / "config.json"
    if not conf.is_file():
        raise ValueError(f"--model {model}: no config.json (expected a HF/diffusers checkpoint folder)")
    cfg = json.loads(conf.read_text())
    return arch.detect(cfg).load(str(p), dtype=jnp.float32), p, str(p)


def _embedded_calib(arch_name: str, path: Path | None, cfg: Any = None, n_batches: int = 4) -> list[dict] | None:
    """The embedded teacher's own calibration set: noised train-split images at a spread of t."""
    if path is None or path.parent != ASSETS:
        return None
    hooks = arch.get(arch_name)
    if hooks.training_batch is None:
        return None
    return [hooks.training_batch(cfg, None, 8, 1234, i) for i in range(n_batches)]
