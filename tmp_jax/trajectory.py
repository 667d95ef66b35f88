"""Calibration on the teacher's own sampling trajectory, scored on the guided output (issue 17 item 1).

A fitness on noised training images at random sigma never sees what decides a sample: the first steps
(sigma = 1, where the sampler fixes class and layout) and the guided direction ``c - u`` that classifier-free
guidance amplifies ``w`` times. Here the calibration states are the teacher's own CFG sampler states at the
inference sigma grid (pure noise first), and each micro-batch holds every state twice, with the class prompt
and with the null prompt. The fitness (:class:`tmp_jax.problem.PruningProblem`) then compares

    g = u + w (c - u)

of the candidate with the teacher's, each state's squared error weighted by its step (early steps count
more: weight ``sigma``, normalised to mean 1; or ``uniform``). Two raw micro-batch keys carry this and never
reach the model:

* ``cfg_guidance`` (1,): ``w``; the batch's first half is conditional, its second half the same latents
  and sigmas unconditional;
* ``sample_weight`` (P,): each pair's weight in the error (and in its normaliser).

Importance statistics and the consumer Grams are gathered on the same states (both halves), so the
compensation re-fits what the sampler feeds the model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tmp_jax import arch

FITNESS_KEYS = ("cfg_guidance", "sample_weight")  # raw micro-batch keys that shape the fitness, not the forward
STEP_WEIGHTS = ("sigma", "uniform")
# what the embedded teachers are evaluated with (tmp_jax.evaluate's cheap setting): 6 Euler steps, CFG 2
STEPS, GUIDANCE = 6, 2.0


def step_weights(kind: str, sigma: np.ndarray) -> np.ndarray:
    """Per-state weights (mean 1) by noise level: ``sigma`` (early, noisy steps count more) or ``uniform``."""
    if kind not in STEP_WEIGHTS:
        raise ValueError(f"step weight {kind!r}: choose from {', '.join(STEP_WEIGHTS)}")
    w = np.ones_like(sigma, np.float64) if kind == "uniform" else np.asarray(sigma, np.float64)
    return (w / max(float(w.mean()), 1e-30)).astype(np.float32)


def sampled_states(
    model: Any,
    *,
    n_labels: int,
    steps: int,
    guidance: float,
    shift: float,
    seed: int,
    teacher_key: str | None = None,
    cache: str | Path | None = None,
) -> np.ndarray:
    """The teacher's sampler states [n_labels, steps, C, H, W] (classes ``0..9`` in turn): read from ``cache`` (an
    ``.npz`` written by :func:`write_states`) when it was made by the same teacher (``teacher_key``, e.g. the
    checkpoint fingerprint) with the same settings, else sampled (a sampler compile and ``steps`` CFG forwards)."""
    from tmp_jax.sampling import sample_latents

    want = _states_meta(n_labels, steps, guidance, shift, seed, teacher_key)
    if cache is not None and teacher_key is not None and Path(cache).is_file():
        with np.load(cache, allow_pickle=False) as z:  # numpy arrays and a JSON string only, never pickles
            if json.loads(str(z["meta"])) == want:
                return np.asarray(z["states"], np.float32)
    labels = np.arange(n_labels) % 10
    _, states = sample_latents(model, labels, seed=seed, steps=steps, guidance=guidance, shift=shift, record=True)
    return states


def _states_meta(n_labels: int, steps: int, guidance: float, shift: float, seed: int, key: str | None) -> dict:
    return {"n_labels": n_labels, "steps": steps, "guidance": guidance, "shift": shift, "seed": seed, "teacher": key}


def write_states(path: str | Path, states: np.ndarray, meta: dict[str, Any]) -> None:
    """Write sampler states and their settings (:func:`sampled_states`' cache) atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".npz")
    os.close(fd)
    try:
        np.savez_compressed(tmp, states=np.asarray(states, np.float32), meta=np.array(json.dumps(meta)))
        os.chmod(tmp, 0o644)  # a package asset: readable by everyone (mkstemp makes it private)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def trajectory_calib(
    model: Any,
    *,
    n_labels: int = 10,
    steps: int = STEPS,
    guidance: float = GUIDANCE,
    shift: float = 1.0,
    seed: int = 1234,
    pairs_per_batch: int = 10,
    step_weight: str = "sigma",
    teacher_key: str | None = None,
    cache: str | Path | None = None,
) -> list[dict[str, Any]]:
    """The teacher's CFG sampler states as calibration micro-batches (module docstring).

    ``n_labels`` samples (classes ``0..9`` in turn) are drawn with ``steps`` Euler steps at guidance
    ``guidance``; every state before a step (``steps`` per sample, sigma = 1 first) becomes one
    conditional/unconditional pair. Pairs are ordered sample-major, so each micro-batch of
    ``pairs_per_batch`` pairs spans the whole sigma grid (a low-fidelity fitness on the first micro-batches
    still sees the first step). ``cache`` / ``teacher_key``: stored states to reuse (:func:`sampled_states`;
    the embedded teachers ship theirs, so a first run compiles no sampler)."""
    from tmp_jax.sampling import sigma_schedule

    hooks = arch.get(model.ARCH)
    if hooks.guided_batch is None:
        raise ValueError(f"arch {model.ARCH!r} has no guided calibration batch (ArchHooks.guided_batch)")
    if n_labels < 1 or steps < 1 or pairs_per_batch < 1:
        raise ValueError("trajectory calibration: n_labels, steps and pairs_per_batch must be >= 1")
    labels = np.arange(n_labels) % 10
    states = sampled_states(
        model,
        n_labels=n_labels,
        steps=steps,
        guidance=guidance,
        shift=shift,
        seed=seed,
        teacher_key=teacher_key,
        cache=cache,
    )
    sig = sigma_schedule(steps, shift)[:steps]  # the state before step i is at sigma_i (sigma_0 = 1)
    lat = states.reshape(n_labels * steps, *states.shape[2:])  # [N * steps, C, H, W], sample-major
    sigma = np.tile(sig, n_labels)
    lab = np.repeat(labels, steps)
    weight = step_weights(step_weight, sigma)
    out = []
    for lo in range(0, len(lat), pairs_per_batch):
        sl = slice(lo, lo + pairs_per_batch)
        b = hooks.guided_batch(model.config, lat[sl], sigma[sl], lab[sl])
        b["cfg_guidance"] = np.full((1,), guidance, np.float32)
        b["sample_weight"] = weight[sl]
        out.append(b)
    return out


def mark_recorded(batches: list[dict[str, Any]], sigmas: list[np.ndarray], guidance: list[float | None]) -> None:
    """Give micro-batches recorded from a real pipeline's sampler their fitness keys, in place.

    ``sigmas[i]``: the noise level of each compared sample of batch i (one per CFG pair, or per row without CFG);
    ``guidance[i]``: the ``w`` of that call's ``u + w (c - u)`` with its rows ordered conditional-first, or None for
    a call without CFG. ``sample_weight`` is :func:`step_weights` ``("sigma")`` over the whole set (early steps count
    more; mean 1), so the set scores like the embedded teachers' shipped trajectories."""
    if not (len(batches) == len(sigmas) == len(guidance)):
        raise ValueError(f"{len(batches)} batches, {len(sigmas)} sigma arrays, {len(guidance)} guidance values")
    flat = np.concatenate([np.asarray(x, np.float64).reshape(-1) for x in sigmas]) if batches else np.zeros(0)
    w = step_weights("sigma", flat)
    at = 0
    for b, sg, g in zip(batches, sigmas, guidance):
        n = int(np.size(sg))
        b["sample_weight"] = w[at : at + n].astype(np.float32)
        at += n
        if g is not None:
            b["cfg_guidance"] = np.asarray([g], np.float32)


def fitness_entries(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """The raw micro-batch's fitness keys (:data:`FITNESS_KEYS`), checked, to carry into its prepared inputs."""
    out = {k: np.asarray(batch[k], np.float32) for k in FITNESS_KEYS if k in batch}
    if "cfg_guidance" in out and out["cfg_guidance"].size != 1:
        raise ValueError(f"cfg_guidance: expected one value, got shape {out['cfg_guidance'].shape}")
    return out


def guided_view(y: np.ndarray, inputs: dict[str, Any], axis: int) -> np.ndarray:
    """The output the fitness compares: ``u + w (c - u)`` of a guided micro-batch (halves along ``axis``),
    else ``y`` itself."""
    w = inputs.get("cfg_guidance")
    if w is None:
        return y
    c, u = np.split(y, 2, axis=axis)
    return u + float(np.asarray(w).reshape(-1)[0]) * (c - u)


def error_weights(inputs: dict[str, Any]) -> np.ndarray:
    """Per compared element, the fitness weight of a prepared micro-batch: its output ``mask`` (the first half
    for a guided batch) times each sample's ``sample_weight``; shape ``mask.shape + (1,)``."""
    mask = np.asarray(inputs["mask"]).astype(np.float64)
    if inputs.get("cfg_guidance") is not None:
        mask = mask[: mask.shape[0] // 2]
    sw = inputs.get("sample_weight")
    if sw is not None:
        sw = np.asarray(sw, np.float64).reshape(-1)
        if sw.shape[0] != mask.shape[0]:
            raise ValueError(f"sample_weight has {sw.shape[0]} entries for {mask.shape[0]} compared samples")
        mask = mask * sw.reshape(-1, *([1] * (mask.ndim - 1)))
    return mask[..., None]


def default_states_file(name: str) -> Path:
    """Where an embedded teacher's shipped sampler states live (next to its checkpoint folder)."""
    from tmp_jax.fmnist import ASSETS

    return ASSETS / f"{name}.trajectory.npz"


def main(argv: list[str] | None = None) -> int:
    """Write an embedded teacher's sampler states (the built-in trajectory calibration) into the package assets."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--model", required=True, choices=["zimage-fmnist", "hunyuan-fmnist"])
    a = p.parse_args(argv)
    from tmp_jax.fileio import fingerprint
    from tmp_jax.teachers import EMBEDDED
    from tmp_jax.teachers import load_model as _load_model

    model, path, _ = _load_model(a.model, "fp32")
    key = fingerprint(path, model.config.to_hf_config())
    kw = {"n_labels": 10, "steps": STEPS, "guidance": GUIDANCE, "shift": 1.0, "seed": 1234}
    states = sampled_states(model, **kw)
    out = default_states_file(a.model)
    write_states(out, states, _states_meta(**kw, key=key))
    print(f"{out}: {states.shape} states of {EMBEDDED[a.model].name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
