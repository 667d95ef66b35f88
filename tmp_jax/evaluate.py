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
import json
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial
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


DEFAULT_TEACHERS = {"zimage": "zimage-fmnist", "hunyuan": "hunyuan-fmnist"}
# config fields a student must share with its teacher (same inputs / conditioning / outputs)
SHARED_FIELDS = {
    "zimage": ("in_channels", "all_patch_size", "cap_feat_dim"),
    "hunyuan": ("latent_channels", "vocab_size", "image_token_id", "timestep_token_id"),
}


class EvaluateError(ValueError):
    """A bad --model / --teacher / --setting (printed as one line by the CLI)."""


# --------------------------------------------------------------------------------------------------
# Loading


_LOADED: dict[str, Any] = {}


def resolve(spec: str | Path) -> Path:
    """The folder of an embedded name or a path; :class:`EvaluateError` (one line) when unusable."""
    from tmp_jax.problem import EMBEDDED

    if str(spec) in EMBEDDED:
        p = EMBEDDED[str(spec)]
        if not (p / "config.json").is_file():
            raise EvaluateError(f"embedded model {spec!r} is missing from this checkout ({p})")
        return p
    p = Path(spec)
    if not p.exists():
        raise EvaluateError(
            f"{spec}: no such file or folder (give zimage-fmnist, hunyuan-fmnist or a checkpoint folder)"
        )
    folder = p if p.is_dir() else p.parent
    conf = folder / "config.json"
    if not conf.is_file():
        raise EvaluateError(f"{spec}: no config.json (expected a Z-Image or HunyuanImage checkpoint folder)")
    if _arch_of(conf) is None:
        raise EvaluateError(f"{spec}: config.json is neither a Z-Image transformer nor a HunyuanImage-3.0 config")
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


@partial(jax.jit, static_argnums=(0, 1))
def _predict(graphdef: Any, lay_key: tuple, state: Any, arrays: dict, xt: jax.Array, sigma: jax.Array, cap: jax.Array):
    from tmp_jax.sampling import FixedLayout, predict_tokens

    lay = FixedLayout(arrays, *lay_key)
    return predict_tokens(nnx.merge(graphdef, state), lay, xt, sigma, cap).astype(jnp.float32)


def _is_hunyuan_cfg(model_cfg: Any) -> bool:
    from tmp_jax.models.hunyuan_image3.config import HunyuanImage3Config

    return isinstance(model_cfg, HunyuanImage3Config)


def heldout_inputs(model_cfg: Any, n: int, seed: int) -> dict[str, np.ndarray]:
    """``n`` test images, fixed noise (``seed``), sigma grid, conditioning, ``x_sigma`` and the target.

    Z-Image: token space (N, tokens, patch_dim), captions ``cap``, target ``x0 - noise``; HunyuanImage:
    latents (N, 4, 14, 14), token sequences ``ids``, target ``noise - x0``."""
    from tmp_jax import data as fm
    from tmp_jax.sampling import patchify

    test = fm.load_subset("test")
    if n > len(test):
        raise EvaluateError(f"{n} held-out images requested; the test subset has {len(test)}")
    hy = _is_hunyuan_cfg(model_cfg)
    lat = fm.to_latents(test.images[:n])  # [N, 4, 14, 14]
    x0 = lat if hy else np.asarray(patchify(jnp.asarray(lat), model_cfg.all_patch_size[0]))
    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), x0.shape, jnp.float32))
    sigma = np.linspace(0.05, 0.95, n, dtype=np.float32)
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    inp = {"x0": x0, "noise": noise, "sigma": sigma, "xt": (1 - s) * x0 + s * noise}
    if hy:
        from tmp_jax.models.hunyuan_image3.train import t2i_ids

        return {**inp, "ids": t2i_ids(test.labels[:n], model_cfg), "target": noise - x0}
    cap = fm.caption_table(model_cfg.cap_feat_dim)[test.labels[:n]]
    return {**inp, "cap": cap, "target": x0 - noise}


def predictions(model: Any, inp: dict[str, np.ndarray], batch: int = BATCH) -> np.ndarray:
    """The model's output on ``inp['xt']``, float32: Z-Image (N, tokens, patch_dim), predicted ``x0 - noise``;
    HunyuanImage (N, C, h, w), predicted ``noise - x0``."""
    from tmp_jax.sampling import fixed_layout, hunyuan_velocity

    if getattr(model, "ARCH", None) == "hunyuan":
        return hunyuan_velocity(model, inp["ids"], inp["xt"], inp["sigma"], batch)

    n = len(inp["xt"])
    bs = min(batch, n)
    lay = fixed_layout(model.config, bs)
    key = (lay.n_img, lay.patch, lay.channels, lay.hw)
    graphdef, state = nnx.split(model)
    out = []
    for i in range(0, n, bs):
        xt, sg, cap = (inp[k][i : i + bs] for k in ("xt", "sigma", "cap"))
        m = len(xt)
        if m < bs:  # keep one compiled shape
            pad = lambda a, k=bs - m: np.concatenate([a, np.repeat(a[-1:], k, 0)])  # noqa: E731
            xt, sg, cap = pad(xt), pad(sg), pad(cap)
        out.append(np.asarray(_predict(graphdef, key, state, lay.arrays, xt, sg, cap))[:m])
    return np.concatenate(out)


def velocity_gap(student: Any, teacher: Any, inp: dict[str, np.ndarray]) -> tuple[float, float]:
    """(MSE, normalised MSE) between student and teacher outputs on the held-out inputs."""
    ys, yt = predictions(student, inp), predictions(teacher, inp)
    return float(np.mean((ys - yt) ** 2)), float(np.sum((ys - yt) ** 2) / np.sum(yt**2))


# --------------------------------------------------------------------------------------------------
# Evaluation


_TEACHER_CACHE: dict[tuple, dict[str, Any]] = {}


def _reference(teacher: Any, st: Setting, seed: int) -> dict[str, Any]:
    """Everything about the teacher one setting needs (computed once per teacher, setting and seed)."""
    key = (id(teacher), st, seed)
    if key in _TEACHER_CACHE:
        return _TEACHER_CACHE[key]
    from tmp_jax import data as fm
    from tmp_jax import evaluator
    from tmp_jax.sampling import sample_images

    test = fm.load_subset("test")
    if st.samples > len(test):
        raise EvaluateError(f"{st.samples} samples requested; the test subset has {len(test)}")
    inp = heldout_inputs(teacher.config, st.fm_images, seed)
    labels = test.labels[: st.samples]
    ref = {
        "teacher": teacher,
        "inputs": inp,
        "pred": predictions(teacher, inp),
        "labels": labels,
        "ref_feats": evaluator.features(test.images),
    }
    ref["samples"] = sample_images(teacher, labels, seed=seed, steps=st.steps, guidance=st.guidance)
    ref["metrics"] = _metrics(teacher, ref, st, seed, pred=ref["pred"], samples=ref["samples"])
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
    from tmp_jax import evaluator
    from tmp_jax.sampling import sample_images

    inp = ref["inputs"]
    if pred is None:
        pred = predictions(model, inp)
    if samples is None:
        samples = sample_images(model, ref["labels"], seed=seed, steps=st.steps, guidance=st.guidance)
    yt = ref["pred"]
    feats, logits = evaluator.features_and_logits(samples)
    d2 = (samples.astype(np.float32) - ref["samples"].astype(np.float32)) / 255.0
    correct = logits.argmax(-1) == ref["labels"]
    out = {
        "params": n_params(model),
        "heldout_fm_mse": float(np.mean((pred - inp["target"]) ** 2)),
        "vel_mse": float(np.mean((pred - yt) ** 2)),
        "vel_rel": float(np.sum((pred - yt) ** 2) / np.sum(yt**2)),
        "class_acc": float(np.mean(correct)),
        "fid_cls": evaluator.fid(feats, ref["ref_feats"]),
        "paired_mse": float(np.mean(d2**2)),
    }
    if st.bootstrap:  # the same replicate draws for every model (seeded), so intervals are comparable
        ci = evaluator.bootstrap_ci(feats, correct, ref["ref_feats"], st.bootstrap, seed)
        out["class_acc_ci"], out["fid_cls_ci"] = list(ci["class_acc"]), list(ci["fid_cls"])
    return out


def evaluate(
    model: str | Path | Any,
    teacher: str | Path | Any | None = None,
    setting: str | Setting = "cheap",
    seed: int = 0,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Metrics of ``model`` (a name, a folder or a loaded model) against ``teacher`` (default: the embedded
    teacher of the model's architecture); see the module doc.

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
    if m_arch not in DEFAULT_TEACHERS:
        raise EvaluateError(f"--model: a {type(m_model).__name__}; Z-Image or HunyuanImage models only")
    t_model = load(DEFAULT_TEACHERS[m_arch] if teacher is None else teacher)
    if getattr(t_model, "ARCH", None) != m_arch:
        raise EvaluateError(f"--model is a {m_arch} model but --teacher is a {getattr(t_model, 'ARCH', '?')} model")
    for k in SHARED_FIELDS[m_arch]:
        if getattr(m_model.config, k) != getattr(t_model.config, k):
            raise EvaluateError(f"--model and --teacher differ in {k}: they are not teacher and student")
    ref = _reference(t_model, st, seed)
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
    p.add_argument("--model", required=True, help="zimage-fmnist, hunyuan-fmnist or a checkpoint folder to evaluate")
    p.add_argument(
        "--teacher",
        default=None,
        help="the reference model (default: the embedded teacher of the model's architecture)",
    )
    p.add_argument("--setting", default="cheap", choices=sorted(SETTINGS), help="cheap (default) or full")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out noise and the sampling noise")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
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
        r = evaluate(a.model, a.teacher, a.setting, a.seed, dtype=dtype)
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
        a.json.write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
