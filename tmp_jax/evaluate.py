"""Quality of a (pruned / recovered) Fashion-MNIST model against its teacher, on held-out data.

    python -m tmp_jax.evaluate --model DIR_OR_NAME [--teacher DIR_OR_NAME] [--setting cheap|full] [--seed S]
                               [--dtype bf16|fp32|auto]

``--model`` / ``--teacher`` is an embedded teacher (``zimage-fmnist``: the Z-Image-architecture DiT;
``hunyuan-fmnist``: the HunyuanImage-3.0-architecture MoE) or a checkpoint folder of either architecture
with a ``config.json`` (diffusers layout for Z-Image, official keys for HunyuanImage): a checkpoint,
``distill-out/weights`` or a ``converters.export`` folder (pruned configs included). The default teacher is
the embedded one of the model's architecture. Everything runs on the TEST split of the committed
Fashion-MNIST subset with fixed seeds, and the teacher and the model always see the same inputs and the
same starting noise:

* ``heldout_fm_mse``   flow-matching MSE: prediction vs its target at ``x_sigma`` (Z-Image predicts
                       ``x0 - noise``, HunyuanImage ``noise - x0``), test images,
                       sigma on a fixed grid in [0.05, 0.95], Gaussian noise from ``--seed``;
* ``vel_mse``          teacher-student velocity MSE on exactly those inputs (``vel_rel``: the same
                       normalised by the teacher's mean square, the search's fitness measure);
* ``class_acc``        accuracy of the committed evaluator CNN on samples, against the class each
                       sample was conditioned on (Euler sampling, CFG 2, labels of the test images);
* ``fid_cls``          Fréchet distance of evaluator features, samples vs the whole test subset;
* ``paired_mse``       mean squared pixel difference (in [0, 1]^2) of each sample vs the teacher's
                       sample from the same noise and label.

``--dtype``: the dtype the model under evaluation is loaded and run in (default ``auto``: bf16 on a GPU/TPU,
fp32 on the CPU), i.e. the model as it would be deployed; the teacher, the reference every metric is taken
against, is always loaded in fp32, and all metrics are computed in fp32 / fp64 on the host.

Settings: ``cheap`` = 512 test images for the MSEs, 200 samples of 6 Euler steps (about a minute on
a 2-core CPU per model); ``full`` = the whole 2048-image test subset for both, 20 Euler steps, and
bias-corrected percentile bootstrap 95% intervals of class accuracy and FID_cls (``class_acc_ci``,
``fid_cls_ci``; 1000 replicates over the samples, the test-subset reference held fixed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmp_jax import dtypes

GUIDANCE = 2.0
BATCH = 256  # MSE forward batch: one compiled shape per model


@dataclass(frozen=True)
class Setting:
    name: str
    fm_images: int  # test images for the flow-matching / velocity MSEs
    samples: int  # generated samples (class accuracy, FID_cls, paired MSE)
    steps: int  # Euler steps
    guidance: float = GUIDANCE
    bootstrap: int = 0  # bootstrap replicates for the 95% intervals of class accuracy and FID_cls (0: none)


SETTINGS = {
    "cheap": Setting("cheap", fm_images=512, samples=200, steps=6),
    "full": Setting("full", fm_images=2048, samples=2048, steps=20, bootstrap=1000),
}


class EvaluateError(ValueError):
    """A bad --model / --teacher / --setting (printed as one line by the CLI)."""


# --------------------------------------------------------------------------------------------------
# Loading


_LOADED: dict[str, Any] = {}


def default_teacher(arch_name: str) -> str:
    """The embedded teacher a model of ``arch_name`` is compared with by default; one-line error if none."""
    from tmp_jax import arch

    names = [t for t, a in arch.embedded_teachers().items() if a == arch_name]
    if not names:
        raise EvaluateError(f"architecture {arch_name!r} has no embedded teacher: pass --teacher")
    return names[0]


def _choices() -> str:
    from tmp_jax import arch

    return ", ".join(arch.embedded_teachers())


def resolve(spec: str | Path) -> Path:
    """The folder of an embedded name or a path; :class:`EvaluateError` (one line) when unusable."""
    from tmp_jax import arch
    from tmp_jax.teachers import EMBEDDED

    if str(spec) in EMBEDDED:
        p = EMBEDDED[str(spec)]
        if not (p / "config.json").is_file():
            raise EvaluateError(f"embedded model {spec!r} is missing from this checkout ({p})")
        return p
    p = Path(spec)
    if not p.exists():
        raise EvaluateError(f"{spec}: no such file or folder (give {_choices()} or a checkpoint folder)")
    folder = p if p.is_dir() else p.parent
    conf = folder / "config.json"
    if not conf.is_file():
        raise EvaluateError(f"{spec}: no config.json (expected a checkpoint folder of {', '.join(arch.names())})")
    if _arch_of(conf) is None:
        raise EvaluateError(f"{spec}: config.json belongs to none of the architectures {', '.join(arch.names())}")
    if not list(folder.glob("*.safetensors")) and not (p.is_file() and p.suffix == ".safetensors"):
        raise EvaluateError(f"{spec}: no .safetensors weights next to config.json")
    return p


def _arch_of(conf: Path) -> str | None:
    """The architecture a config.json belongs to (None: neither)."""
    from tmp_jax import arch

    try:
        d = json.loads(conf.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvaluateError(f"{conf}: unreadable config.json ({e})") from None
    if not isinstance(d, dict):
        return None
    try:
        return arch.detect(d).name
    except ValueError:
        return None


def load(spec: str | Path | Any, dtype: str = "fp32") -> Any:
    """A model from an embedded name or a folder in ``dtype`` (``bf16``, ``fp32``, ``auto``; cached per resolved path
    and dtype); modules pass through as they are."""
    if not isinstance(spec, str | Path):
        return spec
    from tmp_jax import arch
    from tmp_jax.dtypes import resolve as resolve_dtype

    p = resolve(spec)
    dt = resolve_dtype(dtype)
    key = f"{p.resolve()}:{dt}"
    if key not in _LOADED:
        folder = p if p.is_dir() else p.parent
        name = _arch_of(folder / "config.json")
        try:
            _LOADED[key] = arch.get(name).load(str(p), dtype=jnp.dtype(dt))
        except (OSError, ValueError, KeyError) as e:
            raise EvaluateError(f"{spec}: cannot load as a {name} model ({type(e).__name__}: {e})") from None
    return _LOADED[key]


def n_params(model: Any) -> int:
    return int(sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param))))


# --------------------------------------------------------------------------------------------------
# Held-out inputs and forwards


def _hooks_of(cfg_or_model: Any) -> Any:
    """The arch hooks of a model (its ``ARCH``) or of a config (the arch whose config class it is)."""
    from tmp_jax import arch

    name = getattr(cfg_or_model, "ARCH", None)
    h = arch.get(name) if name is not None else arch.of_config(cfg_or_model)
    if h.heldout_inputs is None or h.heldout_predictions is None:
        raise EvaluateError(f"architecture {h.name!r} has no Fashion-MNIST evaluation (heldout_inputs hooks)")
    return h


def heldout_inputs(model_cfg: Any, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` test images, fixed noise (``seed``), sigma grid, conditioning, ``x_sigma`` and the target, in the
    arch's own layout (its ``heldout_inputs`` hook)."""
    from tmp_jax import fmnist as fm

    test = fm.load_subset("test")
    if n > len(test):
        raise EvaluateError(f"{n} held-out images requested; the test subset has {len(test)}")
    lat = fm.to_latents(test.images[:n])  # [N, 4, 14, 14]
    return _hooks_of(model_cfg).heldout_inputs(model_cfg, lat, test.labels[:n], seed)


def predictions(model: Any, inp: dict[str, np.ndarray], batch: int = BATCH) -> np.ndarray:
    """The model's output on ``inp['xt']`` (float32, the layout of ``inp['target']``)."""
    return _hooks_of(model).heldout_predictions(model, inp, batch)


def velocity_gap(student: Any, teacher: Any, inp: dict[str, np.ndarray]) -> tuple[float, float]:
    """(MSE, normalised MSE) between student and teacher outputs on the held-out inputs."""
    ys, yt = predictions(student, inp), predictions(teacher, inp)
    return float(np.mean((ys - yt) ** 2)), float(np.sum((ys - yt) ** 2) / np.sum(yt**2))


# --------------------------------------------------------------------------------------------------
# Evaluation


_TEACHER_CACHE: dict[tuple, dict[str, Any]] = {}


def weights_digest(model: Any) -> str:
    """sha256 of a model's config and every parameter's bytes (what a cached teacher reference is keyed on;
    meant for the small models evaluated here: it reads every weight once)."""
    h = hashlib.sha256(json.dumps(model.config.to_hf_config(), sort_keys=True, default=str).encode())
    for path, leaf in sorted(nnx.to_flat_state(nnx.state(model, nnx.Param)), key=lambda kv: str(kv[0])):
        a = np.asarray(jax.device_get(leaf.get_value()))
        h.update(f"{path}:{a.dtype}:{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _reference(teacher: Any, st: Setting, seed: int, cache_dir: Path | None = None) -> dict[str, Any]:
    """Everything about the teacher one setting needs (computed once per teacher, setting and seed).

    ``cache_dir``: also kept on disk there (``reference-<weights digest>-<setting>-<seed>.npz``: the teacher's
    held-out predictions, its samples and its metrics), so other processes evaluating against the same
    teacher skip its sampling; a file whose digest, setting or seed differ is never read."""
    key = (id(teacher), st, seed)
    if key in _TEACHER_CACHE:
        return _TEACHER_CACHE[key]
    from tmp_jax import fmnist as fm
    from tmp_jax import fmnist_classifier as classifier
    from tmp_jax.sampling import sample_images

    test = fm.load_subset("test")
    if st.samples > len(test):
        raise EvaluateError(f"{st.samples} samples requested; the test subset has {len(test)}")
    inp = heldout_inputs(teacher.config, st.fm_images, seed)
    labels = test.labels[: st.samples]
    ref = {"teacher": teacher, "inputs": inp, "labels": labels, "ref_feats": classifier.features(test.images)}
    file = None
    if cache_dir is not None:
        tag = json.dumps(asdict(st), sort_keys=True)
        file = Path(cache_dir) / f"reference-{weights_digest(teacher)[:20]}-{st.name}-{seed}.npz"
        if file.is_file():
            with np.load(file, allow_pickle=False) as z:
                if str(z["setting"]) == tag:  # the same setting under the same name
                    ref.update(pred=z["pred"], samples=z["samples"], metrics=json.loads(str(z["metrics"])))
                    _TEACHER_CACHE[key] = ref
                    return ref
    ref["pred"] = predictions(teacher, inp)
    ref["samples"] = sample_images(teacher, labels, seed=seed, steps=st.steps, guidance=st.guidance)
    ref["metrics"] = _metrics(teacher, ref, st, seed, pred=ref["pred"], samples=ref["samples"])
    if file is not None:
        from tmp_jax.fileio import atomic_npz

        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_npz(
            file,
            {
                "pred": ref["pred"],
                "samples": ref["samples"],
                "metrics": np.asarray(json.dumps(ref["metrics"])),
                "setting": np.asarray(tag),
            },
        )
    _TEACHER_CACHE[key] = ref
    return ref


def _metrics(
    model: Any,
    ref: dict[str, Any],
    st: Setting,
    seed: int,
    pred: np.ndarray | None = None,
    samples: np.ndarray | None = None,
) -> dict[str, float]:
    from tmp_jax import fmnist_classifier as classifier
    from tmp_jax.sampling import sample_images

    inp = ref["inputs"]
    if pred is None:
        pred = predictions(model, inp)
    if samples is None:
        samples = sample_images(model, ref["labels"], seed=seed, steps=st.steps, guidance=st.guidance)
    yt = ref["pred"]
    feats, logits = classifier.features_and_logits(samples)
    d2 = (samples.astype(np.float32) - ref["samples"].astype(np.float32)) / 255.0
    correct = logits.argmax(-1) == ref["labels"]
    out = {
        "params": n_params(model),
        "heldout_fm_mse": float(np.mean((pred - inp["target"]) ** 2)),
        "vel_mse": float(np.mean((pred - yt) ** 2)),
        "vel_rel": float(np.sum((pred - yt) ** 2) / np.sum(yt**2)),
        "class_acc": float(np.mean(correct)),
        "fid_cls": classifier.fid(feats, ref["ref_feats"]),
        "paired_mse": float(np.mean(d2**2)),
    }
    if st.bootstrap:  # the same replicate draws for every model (seeded), so intervals are comparable
        ci = classifier.bootstrap_ci(feats, correct, ref["ref_feats"], st.bootstrap, seed)
        out["class_acc_ci"], out["fid_cls_ci"] = list(ci["class_acc"]), list(ci["fid_cls"])
    return out


def evaluate(
    model: str | Path | Any,
    teacher: str | Path | Any | None = None,
    setting: str | Setting = "cheap",
    seed: int = 0,
    dtype: str = "auto",
    reference_cache: str | Path | None = None,
) -> dict[str, Any]:
    """Metrics of ``model`` (a name, a folder or a loaded model) against ``teacher`` (default: the embedded
    teacher of the model's architecture); see the module doc.

    ``reference_cache``: a folder where the teacher's side (its samples, predictions and metrics) is kept
    between processes, keyed by a digest of its weights, the setting and the seed (the CLI's
    ``--reference-cache``).

    ``dtype``: the dtype a named ``model`` is loaded in (``bf16``, ``fp32``, ``auto``: bf16 on a GPU/TPU, fp32 on
    the CPU); a loaded model is evaluated as it is. A named teacher is always loaded in fp32 (the reference).

    Returns the model's metrics plus ``teacher`` (the teacher's own metrics under the same setting),
    ``setting`` and ``seconds``. Teacher-side work is cached per (teacher, setting, seed)."""
    t0 = time.time()
    st = setting if isinstance(setting, Setting) else SETTINGS.get(setting)
    if st is None:
        raise EvaluateError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
    try:
        m_model = load(model, dtype)
    except ValueError as e:  # a bad dtype (the CLI checks it first)
        if isinstance(e, EvaluateError):
            raise
        raise EvaluateError(str(e)) from None
    m_arch = getattr(m_model, "ARCH", None)
    if m_arch is None:
        raise EvaluateError(f"--model: a {type(m_model).__name__}, not a model of a registered architecture")
    t_model = load(default_teacher(m_arch) if teacher is None else teacher)
    if getattr(t_model, "ARCH", None) != m_arch:
        raise EvaluateError(f"--model is a {m_arch} model but --teacher is a {getattr(t_model, 'ARCH', '?')} model")
    from tmp_jax import arch

    for k in arch.get(m_arch).student_fields:
        if getattr(m_model.config, k) != getattr(t_model.config, k):
            raise EvaluateError(f"--model and --teacher differ in {k}: they are not teacher and student")
    ref = _reference(t_model, st, seed, None if reference_cache is None else Path(reference_cache))
    if m_model is t_model:
        out = dict(ref["metrics"])
    else:
        out = _metrics(m_model, ref, st, seed)
    out["teacher"] = dict(ref["metrics"])
    out["setting"] = asdict(st)
    out["seed"] = seed
    out["dtype"] = dtypes.model_dtype(m_model)
    out["seconds"] = time.time() - t0
    return out


COLUMNS = (
    ("params", "params", "{:,}"),
    ("vel_mse", "velocity MSE vs teacher", "{:.5f}"),
    ("vel_rel", "(normalised)", "{:.4f}"),
    ("heldout_fm_mse", "held-out FM MSE", "{:.4f}"),
    ("class_acc", "class acc.", "{:.3f}"),
    ("fid_cls", "FID_cls", "{:.2f}"),
    ("paired_mse", "paired sample MSE", "{:.4f}"),
)


def table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    """A plain-text table of named metric dicts."""
    head = ["model"] + [h for _, h, _ in COLUMNS]

    def cell(m: dict[str, Any], k: str, f: str) -> str:  # with its bootstrap interval where there is one
        ci = m.get(f"{k}_ci")
        return f.format(m[k]) + (f" [{f.format(ci[0])}, {f.format(ci[1])}]" if ci else "")

    body = [[name] + [cell(m, k, f) for k, _, f in COLUMNS] for name, m in rows]
    w = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(r))  # noqa: E731
    return "\n".join([line(head), line(["-" * x for x in w])] + [line(r) for r in body])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tmp_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help=f"{_choices()} or a checkpoint folder to evaluate")
    p.add_argument(
        "--teacher",
        default=None,
        help="the reference model (default: the embedded teacher of the model's architecture)",
    )
    p.add_argument("--setting", default="cheap", choices=sorted(SETTINGS), help="cheap (default) or full")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out noise and the sampling noise")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument(
        "--reference-cache",
        type=Path,
        default=None,
        help="folder that keeps the teacher's samples and metrics between runs (keyed by its weights, the setting "
        "and the seed): evaluating several models against one teacher samples the teacher once",
    )
    dtypes.add_argument(
        p,
        help="dtype the model under evaluation is loaded and run in: bf16, fp32 or auto (default: auto = bf16 on a "
        "GPU/TPU, fp32 on the CPU); the teacher (the reference) is loaded in fp32 and the metrics are computed in "
        "fp32/fp64 either way",
    )
    a = p.parse_args(argv)
    dtype = dtypes.from_args(p, a.dtype)
    from tmp_jax.compile_cache import enable_default

    enable_default()  # persistent XLA compilation cache (TMP_JAX_COMPILATION_CACHE=off disables)
    try:
        r = evaluate(a.model, a.teacher, a.setting, a.seed, dtype=dtype, reference_cache=a.reference_cache)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    st = r["setting"]
    print(
        f"setting {st['name']}: {st['fm_images']} test images for the MSEs, {st['samples']} samples of "
        f"{st['steps']} Euler steps (CFG {st['guidance']:g}), seed {r['seed']}, model in {r['dtype']}; "
        f"{r['seconds']:.0f} s"
    )
    print(table([("teacher", r["teacher"]), (str(a.model), r)]))
    if a.json:
        from tmp_jax.fileio import atomic_write

        atomic_write(a.json, json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
