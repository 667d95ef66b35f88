"""``python -m converters.run_torch`` on tiny exports (CPU, fp32).

HunyuanImage-3.0: our denoiser (nemo building blocks + our routed experts) on an unquantised export equals
nemo-automodel's full ``HunyuanImage3ForCausalMM`` loaded from the same folder (rel. err <= 1e-5, forward and a
2-step Euler run); on int8 / fp8 exports it stays within the stated tolerance of that model; with experts
offloaded by a memory plan the output equals the non-offloaded run EXACTLY. Z-Image: the runner's module on an
unquantised export equals diffusers' ``AutoModel`` on the same folder; int8 / fp8 within tolerance.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nemo_automodel")
pytest.importorskip("diffusers")

from test_export_hunyuan import _genome, _plan, nemo_from_folder, src  # noqa: E402,F401
from test_hunyuan_parity import rel_errs, renormalised_top1, t2i_inputs  # noqa: E402,F401

from converters import run_torch as rt  # noqa: E402
from converters.export import ExportConfig, export  # noqa: E402
from converters.memory_plan import make_plan  # noqa: E402
from tmp_jax.sampling import sigma_schedule  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning")]
TOL = 1e-5
# measured on these tiny random models: int8 1.7e-2 / 1.1e-2, fp8 3.8e-2 / 3.4e-2 (Hunyuan); Z-Image similar
QTOL = {"int8": 4e-2, "fp8": 8e-2}


@pytest.fixture(scope="module")
def hy_exports(src, tmp_path_factory):  # noqa: F811
    folder, model, tree = src
    tmp = tmp_path_factory.mktemp("hy_run")
    plan = _plan(tmp, folder, model, tree, _genome(tree, "hetero"), None)
    outs = {}
    for q in ("none", "int8", "fp8"):
        export(ExportConfig(plan=plan, model=folder, out=tmp / q, progress=False, quantize=q))
        outs[q] = tmp / q
    return outs


def _fwd(model, ids, lat, t):
    with torch.no_grad():
        return model(*(torch.from_numpy(x) for x in (ids, lat, t))).numpy()


def test_hunyuan_runner_matches_nemo(hy_exports):
    ref = nemo_from_folder(hy_exports["none"])
    ids, lat, t, _ = t2i_inputs(np.random.default_rng(7), (5,), (3, 4), 4)
    with torch.no_grad():
        y_ref = ref(*(torch.from_numpy(x) for x in (ids, lat, t)))[0].numpy()
    ex, ours = rt.load(hy_exports["none"])
    assert max(rel_errs(_fwd(ours, ids, lat, t), y_ref)) <= TOL
    for q in ("int8", "fp8"):
        _, mq = rt.load(hy_exports[q])
        errs = rel_errs(_fwd(mq, ids, lat, t), y_ref)
        assert 0 < max(errs) <= QTOL[q], (q, errs)
    # 2 Euler steps: the runner's sampler against a loop over nemo's model (same noise, ids, schedule)
    res = rt.sample(ex, ours, steps=2, resolution=48, text_tokens=5, seed=3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn((1, 4, 3, 3), generator=g)
    ids = rt.hunyuan_inputs(ex.conf, (3, 3), 5, 3)
    sig = [float(s) for s in sigma_schedule(2, 3.0)]
    with torch.no_grad():
        for s, s_next in zip(sig[:-1], sig[1:]):
            x = x + (s_next - s) * ref(ids, x, torch.full((1,), s * 1000.0))[0]
    assert max(rel_errs(res.latents.numpy(), x.numpy())) <= TOL


def test_hunyuan_offload_equals_resident(hy_exports, monkeypatch):
    folder = hy_exports["int8"]
    full = make_plan(folder, 10**12, resolution=48, text_tokens=5)
    assert full["offloaded_experts"] == {}
    # a target between "all offloaded" and "all resident" leaves some experts on each side
    target = full["estimate"]["peak_bytes"] - full["estimate"]["resident_expert_bytes"] // 4
    plan = make_plan(folder, target, resolution=48, text_tokens=5)
    off = {int(k): v for k, v in plan["offloaded_experts"].items()}
    n_off = sum(map(len, off.values()))
    assert 0 < n_off < sum(json.loads((folder / "config.json").read_text())["num_experts"])
    assert plan["cpu_resident"] == ["model.wte.weight"] and "lm_head.weight" in plan["not_loaded"]
    assert plan["estimate"]["peak_bytes"] <= target
    ex, resident = rt.load(folder)
    _, offloaded = rt.load(folder, memory_plan=plan)
    for i, layer in enumerate(offloaded.model.layers):
        assert layer.mlp.offloaded == off.get(i, [])
    fetched = []
    real = rt.ExpertWeights.to
    monkeypatch.setattr(rt.ExpertWeights, "to", lambda self, *a, **k: fetched.append(1) or real(self, *a, **k))
    ids, lat, t, _ = t2i_inputs(np.random.default_rng(8), (6,), (3, 3), 4)
    y_off = _fwd(offloaded, ids, lat, t)
    assert len(fetched) == n_off  # every offloaded expert fetched once per forward, nothing else
    y_res = _fwd(resident, ids, lat, t)
    assert y_off.tobytes() == y_res.tobytes()


def test_run_torch_cli(hy_exports, tmp_path, capsys):
    from safetensors.numpy import load_file

    out = tmp_path / "lat.safetensors"
    plan = make_plan(hy_exports["int8"], 10**12, resolution=48, text_tokens=5)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    args = ["--model", str(hy_exports["int8"]), "--steps", "2", "--resolution", "48", "--text-tokens", "5"]
    assert rt.main([*args, "--device", "cpu", "--dtype", "fp32", "--memory-plan", str(tmp_path / "plan.json"),
                    "--out", str(out)]) == 0  # fmt: skip
    lat = load_file(str(out))["latents"]
    assert lat.shape == (1, 4, 3, 3) and np.isfinite(lat).all()
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["seconds_per_step"]) == 2
    plan["arch"] = "zimage"
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    assert rt.main([*args, "--device", "cpu", "--memory-plan", str(tmp_path / "bad.json")]) == 2
    assert "memory plan is for zimage, the export is hunyuan" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Z-Image
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def z_exports(tmp_path_factory):
    from plan_ref import write_plan
    from zimage_ref import save_diffusers, tiny_diffusers

    from converters.zimage import load_zimage
    from tmp_jax import arch
    from tmp_jax.tree import Tree

    tmp = tmp_path_factory.mktemp("z_run")
    ref = tiny_diffusers(seed=5, n_layers=3, n_heads=4, axes_dims=[4, 6, 6], n_refiner_layers=2)
    folder = save_diffusers(ref, tmp / "src")
    model = load_zimage(folder)
    tree = Tree(arch.get("zimage").build_spec(model.config))
    g = np.random.default_rng(0).integers(1, tree.max_levels() + 1)  # heterogeneous widths: our subclass
    plan = write_plan(tmp / "plan.json", "zimage", folder, model, tree, g, None)
    outs = {}
    for q in ("none", "int8", "fp8"):
        export(ExportConfig(plan=plan, model=folder, out=tmp / q, progress=False, quantize=q))
        outs[q] = tmp / q
    return outs


def test_zimage_runner(z_exports):
    from diffusers import AutoModel

    pt = AutoModel.from_pretrained(str(z_exports["none"]), trust_remote_code=True).eval()
    ex, ours = rt.load(z_exports["none"])
    want = rt.sample(ex, pt, steps=2, resolution=64, text_tokens=7).latents.numpy()
    got = rt.sample(ex, ours, steps=2, resolution=64, text_tokens=7).latents.numpy()
    assert max(rel_errs(got, want)) <= TOL
    for q in ("int8", "fp8"):
        exq, mq = rt.load(z_exports[q])
        assert sum(isinstance(m, rt.QLinear) for m in mq.modules()) == len(exq.quantized) > 0
        errs = rel_errs(rt.sample(exq, mq, steps=2, resolution=64, text_tokens=7).latents.numpy(), want)
        assert 0 < max(errs) <= QTOL[q], (q, errs)


def test_choose_offload_fills_the_room_a_large_expert_leaves():
    """Experts of different widths (a pruned model): after the largest layer's next expert no longer fits,
    smaller ones that do fit are made resident too, and the peak stays within the target."""
    from converters.memory_plan import choose_offload

    experts = {(0, 0): 50, (0, 1): 50, (1, 0): 10, (1, 1): 10, (1, 2): 10}  # layer 0 wide, layer 1 narrow
    fixed, target = 100, 215

    def peak(off: dict, resident: int) -> int:
        return fixed + resident + max(sum(experts[(la, e)] for e in es) for la, es in off.items())

    off, resident = choose_offload(experts, fixed, target)
    assert resident == sum(experts.values()) - sum(experts[(la, e)] for la, es in off.items() for e in es)
    # (0, 0) resident (peak 200); (0, 1) would make it 230; the old greedy stopped there with 50 bytes
    # resident. One narrow expert still fits: 60 resident, peak 210 <= 215; a second would be 220.
    assert off == {0: [1], 1: [1, 2]} and resident == 60 and peak(off, resident) == 210
    assert choose_offload(experts, fixed, 10**9) == ({0: [], 1: []}, 130)  # everything fits: nothing offloaded
