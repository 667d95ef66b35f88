"""Streamed (block-by-block, weights read from the checkpoint) calibration == in-memory calibration, on both
tiny models: same statistics and teacher outputs, at most the stem + one block's parameters live (measured
by instrumenting the loader), every tensor read once, resumable, sharded == single device, automatic choice.
"""

from __future__ import annotations

import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from converters.engine import SafetensorsReader, save_model
from tmp_jax import arch
from tmp_jax import streamed_calibration as sc
from tmp_jax.calibration import calibrate
from tmp_jax.models.hunyuan_image3 import TINY as HTINY
from tmp_jax.models.z_image import TINY as ZTINY
from tmp_jax.sharding import make_mesh

# Per-layer MoE shapes (layer 0: top-1 of 4 experts; layer 1: top-2 of 6 narrower ones), 4 latent channels.
HCFG = HTINY.replace(
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=(4, 6),
    moe_topk=(1, 2),
    moe_intermediate_size=(32, 16),
    num_shared_expert=(1, 2),
    vae={"latent_channels": 4},
)


def _save(name, cfg, model, folder):
    if name == "zimage":
        model.save_pretrained(str(folder))
    else:
        from converters.hunyuan import hunyuan_key_table

        conf = {"model_type": "hunyuan_image_3_moe", "architectures": ["HunyuanImage3ForCausalMM"]}
        conf.update(cfg.to_hf_config())
        save_model(model, hunyuan_key_table(cfg), folder, prefix="model", config=conf)
    return folder


@pytest.fixture(scope="module", params=["zimage", "hunyuan"])
def setup(request, tmp_path_factory):
    name = request.param
    cfg = ZTINY if name == "zimage" else HCFG
    h = arch.get(name)
    model = h.init_random(cfg, jnp.float32, 0)
    path = _save(name, cfg, model, tmp_path_factory.mktemp(name) / "ckpt")
    batches = h.synthetic_calib(cfg, 8, 4, 0)  # 2 micro-batches of 4
    return name, path, model, batches, calibrate(model, batches)


def _assert_same(cal, ref, rtol=1e-5, atol=1e-6):
    """Same statistic keys, statistics within ``rtol`` (atol relative to the statistic's scale), teacher
    outputs within ``rtol`` / ``atol``."""
    assert set(cal.stats) == set(ref.stats)
    for k, v in ref.stats.items():
        np.testing.assert_allclose(cal.stats[k], v, rtol=rtol, atol=1e-6 * float(np.abs(v).max()), err_msg=str(k))
    assert len(cal.teacher) == len(ref.teacher)
    for a, b in zip(cal.teacher, ref.teacher):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


@pytest.fixture()
def instrumented(monkeypatch):
    """Counts live parameter arrays created by the streamed loader (device side) and host arrays read from
    the checkpoint, through weak references, so anything the calibration keeps alive is counted."""
    m = {"dev": 0, "dev_peak": 0, "host": 0, "host_peak": 0, "reads": []}

    def track(x, kind):
        m[kind] += x.nbytes
        m[f"{kind}_peak"] = max(m[f"{kind}_peak"], m[kind])
        weakref.finalize(x, lambda n=x.nbytes: m.__setitem__(kind, m[kind] - n))
        return x

    real_place, real_read = sc._place, SafetensorsReader.read
    monkeypatch.setattr(sc, "_place", lambda *a: track(real_place(*a), "dev"))
    monkeypatch.setattr(
        SafetensorsReader, "read", lambda self, k: m["reads"].append(k) or track(real_read(self, k), "host")
    )
    return m


def _block_bytes(name, cfg):
    """Parameter bytes (fp32) of the stem (everything outside the blocks) and of each block, from the spec."""
    sizes = {p: int(np.prod(s)) * 4 for p, s in arch.get(name).build_spec(cfg).shapes.items()}
    blocks = [s.path for s in sc.get_hooks(name).schedule(cfg) if s.kind == "block"]
    per = [sum(v for p, v in sizes.items() if p[: len(b)] == b) for b in blocks]
    return sum(sizes.values()) - sum(per), per


def test_streamed_equals_in_memory_and_bounded(setup, instrumented):
    name, path, model, batches, ref = setup
    cal = sc.calibrate_streamed(path, batches, carry_on="host" if name == "hunyuan" else "device")
    _assert_same(cal, ref)
    assert instrumented["dev"] == 0  # nothing of the weights outlives the calibration
    stem, blocks = _block_bytes(name, model.config)
    assert len(blocks) >= 2
    bound = stem + max(blocks)  # never more than the stem and ONE block
    assert max(blocks) <= instrumented["dev_peak"] <= bound < stem + sum(blocks)
    assert instrumented["host_peak"] <= bound
    # every tensor the teacher needs is read exactly once (Hunyuan's text head lm_head / ln_f never)
    reads = instrumented["reads"]
    assert len(reads) == len(set(reads))
    unread = set(SafetensorsReader(path).keys()) - set(reads)
    assert unread == (set() if name == "zimage" else {"lm_head.weight", "model.ln_f.weight"})


@pytest.mark.parametrize("every", [1, 2])
def test_resume_after_interruption(setup, tmp_path, monkeypatch, every):
    name, path, model, batches, ref = setup
    steps = sc.get_hooks(name).schedule(model.config)
    blocks = [i for i, s in enumerate(steps) if s.kind == "block"]
    real = sc._block_jit
    calls = {"n": 0}

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == (len(blocks) - 1) * len(batches) + 2:  # in the last block, second micro-batch
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(sc, "_block_jit", boom)
    with pytest.raises(KeyboardInterrupt):
        sc.calibrate_streamed(path, batches, out=tmp_path, checkpoint_every=every)
    # one state file per micro-batch, at the last checkpointed step it finished
    last, done_0 = blocks[-1], blocks[-1] + 1  # micro-batch 0 finished the last block, micro-batch 1 did not
    at = [done_0 if done_0 % every == 0 else done_0 - done_0 % every, last - last % every]
    want = sorted(f"mb-{m:05d}-at-{a:04d}.npz" for m, a in enumerate(at) if a)
    assert sorted(p.name for p in (tmp_path / sc.STREAM_DIR).iterdir()) == want
    calls["n"] = -(10**9)  # no more interruptions; count again from here
    cal = sc.calibrate_streamed(path, batches, out=tmp_path, checkpoint_every=every)
    # only what was not written is recomputed: blocks after each micro-batch's last written step
    assert calls["n"] + 10**9 == sum(sum(b >= a for b in blocks) for a in at)
    _assert_same(cal, sc.calibrate_streamed(path, batches), rtol=0, atol=0)  # == an uninterrupted run, exactly
    _assert_same(cal, ref)
    assert (tmp_path / "calib_state.npz").is_file() and not (tmp_path / sc.STREAM_DIR).exists()
    # the finished result is the in-memory calibration's state: reused by both, nothing recomputed
    monkeypatch.setattr(sc, "_block_jit", None)
    _assert_same(sc.calibrate_streamed(path, batches, out=tmp_path), cal, rtol=0, atol=0)
    _assert_same(calibrate(model, batches, out=tmp_path), cal, rtol=0, atol=0)


def test_sharded_streamed_equals_single_device(setup):
    name, path, model, batches, ref = setup
    mesh = make_mesh("data:4,model:2" if name == "zimage" else "data:2,expert:2,model:2", jax.devices()[:8])
    cal = sc.calibrate_streamed(path, batches, mesh=mesh)
    # model-axis sharding reorders reductions: the tolerances of the in-memory sharded tests
    _assert_same(cal, ref, rtol=2e-5, atol=1e-5)


def test_automatic_choice(setup, monkeypatch):
    name, path, model, batches, ref = setup
    stem, blocks = _block_bytes(name, model.config)
    assert sc.checkpoint_param_bytes(path) == stem + sum(blocks)  # every fp32 parameter, from the headers
    assert sc.checkpoint_param_bytes(path, jnp.bfloat16) == (stem + sum(blocks)) // 2
    seen = []
    real = sc.calibrate_streamed
    monkeypatch.setattr(sc, "calibrate_streamed", lambda *a, **k: seen.append(1) or real(*a, **k))
    monkeypatch.setattr(sc, "device_capacity", lambda mesh=None: sc.checkpoint_param_bytes(path))  # 2x too small
    _assert_same(calibrate(str(path), batches), ref)
    assert seen == [1]
    monkeypatch.setattr(sc, "device_capacity", lambda mesh=None: 1 << 40)
    _assert_same(calibrate(path, batches), ref)  # fits: loaded and calibrated in memory
    assert seen == [1]
    with pytest.raises(ValueError, match="pass its path"):
        calibrate(model, batches, streamed=True)


def test_carry_files_keep_bf16(tmp_path):
    x = {"a": np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16), "m": np.array([True, False])}
    sc._save_arrays(tmp_path / "c.npz", x)
    y = sc._load_arrays(tmp_path / "c.npz")
    assert y["a"].dtype == x["a"].dtype and y["m"].dtype == bool
    np.testing.assert_array_equal(y["a"].astype(np.float32), x["a"].astype(np.float32))


# ----------------------------------------------------------------------------------------------
# Consumer Grams (compensated pruning), streamed: one block's on the device, then host RAM or one file per block


def _gram_keys(stats):
    return sorted((k for k in stats if str(k[-1]).startswith("gram_")), key=str)


def _problem(model, cal):
    from tmp_jax.compensate import CompensationConfig
    from tmp_jax.problem import PruningProblem

    src = {"path": None, "fingerprint": "t", "config": {}}
    comp = CompensationConfig(damp=1e-3)
    return PruningProblem(model, cal, source=src, levels={"fractions": [0.5, 1.0]}, compensation=comp)


def test_streamed_grams_equal_in_memory(setup, tmp_path, monkeypatch):
    """Streamed calibration with Grams == the in-memory ``calibrate(grams=True)``: host RAM without a run folder
    (here with the high-noise timestep weighting), one file per block with one (uniform); each block's Grams
    leave the device when the block is done; the compensated order and re-fits built from the file-backed
    Grams equal those from the in-memory ones."""
    from tmp_jax.compensate import StoredGram

    name, path, model, batches, _ = setup
    ref = calibrate(model, batches, grams=True)
    blocks = [s.path for s in sc.get_hooks(name).schedule(model.config) if s.kind == "block"]
    stored = []  # per move off the device: the blocks whose Grams it held (the one just done), and the file
    real_store = sc._store_block_grams

    def store(acc, f, sig):
        stored.append(([b for b in blocks if all(k[: len(b)] == b for k in acc)], f))
        return real_store(acc, f, sig)

    monkeypatch.setattr(sc, "_store_block_grams", store)
    hn = calibrate(path, batches, streamed=True, grams=True, gram_timestep_weight="high-noise")
    _assert_same(hn, calibrate(model, batches, grams=True, gram_timestep_weight="high-noise"))
    assert all(isinstance(hn.stats[k], np.ndarray) for k in _gram_keys(hn.stats))
    # one move off the device per block, holding that block's Grams only, to host RAM
    assert [b for b, _ in stored] == [[b] for b in blocks] and all(f is None for _, f in stored)
    stored.clear()
    cal = sc.calibrate_streamed(path, batches, grams=True, out=tmp_path)
    _assert_same(cal, ref)  # fp32: rtol 1e-5, atol 1e-6 x the Gram's largest entry (other compiled programs)
    keys = _gram_keys(cal.stats)
    assert keys == _gram_keys(ref.stats) and all(isinstance(cal.stats[k], StoredGram) for k in keys)
    files = sorted(p.name for p in (tmp_path / sc.GRAM_DIR).iterdir())
    assert files == sorted(f.name for _, f in stored) and len(files) == len(blocks)
    # the finished state names the Gram files; reading it back (either calibration) gives the same Grams
    again = calibrate(model, batches, grams=True, out=tmp_path)
    for k in keys:
        assert isinstance(again.stats[k], StoredGram)
        np.testing.assert_array_equal(np.asarray(again.stats[k]), np.asarray(cal.stats[k]))
    # compensated pruning from the file-backed Grams == from the in-memory ones
    a, b = _problem(model, ref), _problem(model, cal)
    assert set(a.order) == set(b.order)
    for k in a.order:
        np.testing.assert_array_equal(a.order[k], b.order[k], err_msg=str(k))
    assert set(a.refits) == set(b.refits) and a.refits
    for k, v in a.refits.items():
        np.testing.assert_allclose(np.asarray(b.refits[k]), np.asarray(v), rtol=1e-4, atol=1e-5, err_msg=str(k))
    # the Grams stay on disk through the permutation (applied on read) and the plan's Gram file
    from tmp_jax.compensate import Compensation

    sha = b.compensation.save(tmp_path / "compensation.safetensors")
    back = Compensation.load(tmp_path / "compensation.safetensors", b.compensation.config, sha256=sha)
    for k, g in a._comp_perm.grams.items():
        assert isinstance(b._comp_perm.grams[k], StoredGram)
        tol = 1e-5 * float(np.abs(g).max())
        np.testing.assert_allclose(np.asarray(b._comp_perm.grams[k]), g, rtol=1e-5, atol=tol, err_msg=str(k))
        np.testing.assert_array_equal(np.asarray(back.grams[k]), np.asarray(b.compensation.grams[k]))


def test_streamed_grams_resume(setup, tmp_path, monkeypatch):
    """Interrupted streamed calibrations with Grams resume to exactly the uninterrupted result: (a) inside a
    block (its Grams were on the device: the block is re-run for every micro-batch, no state past it exists);
    (b) after a block's Gram file was written but before every micro-batch's state was (the micro-batch
    re-runs the block for its activations and adds nothing to the Grams)."""
    name, path, model, batches, _ = setup
    steps = sc.get_hooks(name).schedule(model.config)
    blocks = [i for i, s in enumerate(steps) if s.kind == "block"]
    want = sc.calibrate_streamed(path, batches, grams=True)
    real_block, real_write = sc._block_jit, sc._write_mb
    calls = {"n": 0}

    def boom(*a):
        calls["n"] += 1
        if calls["n"] == (len(blocks) - 1) * len(batches) + 2:  # in the last block, second micro-batch
            raise KeyboardInterrupt
        return real_block(*a)

    def exact(cal):
        assert _gram_keys(cal.stats) == _gram_keys(want.stats)
        for k in _gram_keys(want.stats):
            np.testing.assert_array_equal(np.asarray(cal.stats[k]), np.asarray(want.stats[k]), err_msg=str(k))
        _assert_same(cal, want, rtol=0, atol=0)

    monkeypatch.setattr(sc, "_block_jit", boom)
    with pytest.raises(KeyboardInterrupt):
        sc.calibrate_streamed(path, batches, grams=True, out=tmp_path / "a")
    grams = sorted(p.name for p in (tmp_path / "a" / sc.GRAM_DIR).iterdir())
    assert grams == [sc._gram_file(tmp_path, si).name for si in blocks[:-1]]  # every block but the one in progress
    states = sorted(p.name for p in (tmp_path / "a" / sc.STREAM_DIR).iterdir())
    assert states == [f"mb-{m:05d}-at-{blocks[-1]:04d}.npz" for m in range(len(batches))]  # none past it
    calls["n"] = -(10**9)
    exact(sc.calibrate_streamed(path, batches, grams=True, out=tmp_path / "a"))
    assert calls["n"] + 10**9 == len(batches)  # only the interrupted block, for every micro-batch

    monkeypatch.setattr(sc, "_block_jit", real_block)
    second = blocks[1]

    def write_boom(root, m, at, *a):
        if at == second + 1 and m == 1:  # block `second`'s Grams are on disk, micro-batch 1's state is not
            raise KeyboardInterrupt
        return real_write(root, m, at, *a)

    monkeypatch.setattr(sc, "_write_mb", write_boom)
    with pytest.raises(KeyboardInterrupt):
        sc.calibrate_streamed(path, batches, grams=True, out=tmp_path / "b")
    assert sc._gram_file(tmp_path / "b" / sc.GRAM_DIR, second).is_file()
    monkeypatch.setattr(sc, "_write_mb", real_write)
    exact(sc.calibrate_streamed(path, batches, grams=True, out=tmp_path / "b"))
    # another Gram setting is another calibration: its states and Grams are refused, not mixed
    with pytest.raises(ValueError, match="resume state"):
        sc.calibrate_streamed(path, batches, grams=True, gram_timestep_weight="high-noise", out=tmp_path / "b")
