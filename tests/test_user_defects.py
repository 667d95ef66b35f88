"""User-facing defects, one test each (every one fails without its fix):

1. a heterogeneous Z-Image export (per-block widths, ``auto_map``) loads back into ``ZImageTransformer`` with the
   pruned config and gives the JAX pruned model's outputs; HF metadata keys are ignored, ``quantization_config``
   is refused by name;
2. ``HunyuanImage3.from_pretrained`` / ``save_pretrained`` exist (round trip), and a pruned HunyuanImage export
   (per-layer expert counts / widths) loads back with the pruned config and the same outputs;
3. ``python -m converters.export --model zimage-fmnist`` resolves the embedded names like search / evaluate;
4. a FLOP budget counts each architecture's own sequence (HunyuanImage's joint sequence, not Z-Image's);
5. ``python -m tmp_jax.search --budget`` at or above the model's size fails at once, naming the budget;
6. progress bars written to a log (not a terminal) are plain lines, no carriage returns, a bounded number.

Tiny random models only (no torch), a few seconds each.
"""

from __future__ import annotations

import io
import json
import time
from functools import partial
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from plan_ref import write_plan
from test_search import fast_random_model
from zimage_ref import inputs

from converters.export import ExportConfig, export
from tmp_jax import arch
from tmp_jax.materialize import materialize
from tmp_jax.tree import Tree

ZH, HH = arch.get("zimage"), arch.get("hunyuan")
TOL = 1e-5


def _rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _order(tree: Tree, seed: int) -> dict:
    """A random unit order (kept units are then a scattered subset of the original numbering)."""
    rng = np.random.default_rng(seed)
    return {(n.name, u.kind): rng.permutation(u.n) for n in tree.spec.nodes() for u in n.units}


def _put(tree: Tree, g: np.ndarray, name: str, count: int) -> None:
    i = [x.name for x in tree.genes].index(name)
    g[i] = tree.genes[i].counts.index(count)


# ----------------------------------------------------------------------------------------------------------
# 1. heterogeneous Z-Image export -> ZImageTransformer.from_pretrained (and 6: its progress bar in a log)
# ----------------------------------------------------------------------------------------------------------
def test_zimage_hetero_export_loads_back_into_jax(tmp_path, capsys):
    from tmp_jax.evaluate import load as evaluate_load
    from tmp_jax.models.z_image import TINY, ZImageTransformer
    from tmp_jax.models.z_image.config import ZImageConfig

    cfg = TINY.replace(n_layers=3, n_refiner_layers=2)
    src = tmp_path / "src"
    fast_random_model(cfg, seed=3).save_pretrained(str(src))  # every parameter random, no eager jax init
    model = ZImageTransformer.from_pretrained(str(src))
    tree = Tree(ZH.build_spec(model.config))
    g = tree.full_genome()
    _put(tree, g, "layers.1:keep", 0)
    _put(tree, g, "layers.0.feed_forward:ffn", 64)
    _put(tree, g, "layers.2.attention:heads", 1)
    _put(tree, g, "noise_refiner.0.feed_forward:ffn", 106)
    _put(tree, g, "context_refiner.1.attention:heads", 0)  # a skipped sub-layer
    order = _order(tree, 1)
    plan = write_plan(tmp_path / "plan.json", "zimage", src, model, tree, g, order)
    out = tmp_path / "pruned"
    capsys.readouterr()
    res = export(ExportConfig(plan=plan, model=src, out=out, progress=True))  # progress to a non-terminal
    err = capsys.readouterr().err
    assert "ZImagePrunedTransformer2DModel" in res["layout"]
    conf = json.loads((out / "config.json").read_text())
    assert "auto_map" in conf and conf["layers_heads"] == [2, 1]  # per-block widths, the diffusers subclass

    small = materialize(model, tree, tree.decode(g), order)
    back = ZImageTransformer.from_pretrained(str(out))
    assert back.config == small.config and back.config.is_pruned
    assert evaluate_load(out).config == small.config  # python -m tmp_jax.evaluate --model EXPORT
    x, t, cap = inputs(seed=3, sizes=((8, 8), (8, 12)), cap_lens=(7, 20))
    for got, want in zip(back(x, t, cap), small(x, t, cap)):
        assert _rel(got, want) <= TOL

    # 6: the export's bar, written to a captured (non-terminal) stderr: plain lines, first and final state
    lines = [ln for ln in err.splitlines() if ln.startswith("export")]
    assert "\r" not in err and 2 <= len(lines) <= 4 and f"{lines[-1]}".count("100%") == 1

    # HF bookkeeping keys are ignored; a quantised export is refused by name; anything else unknown still fails
    meta = {
        "auto_map": {"AutoModel": "m.C"},
        "architectures": ["ZImagePrunedTransformer2DModel"],
        "transformers_version": "5.0",
        "torch_dtype": "float32",
        "_name_or_path": "x",
    }
    assert ZImageConfig.from_hf_config({**conf, **meta}) == small.config
    with pytest.raises(ValueError, match="quantization_config") as e:
        ZImageConfig.from_hf_config({**conf, "quantization_config": {"quant_method": "tmp-jax"}})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown Z-Image field 'bogus'"):
        ZImageConfig.from_hf_config({**conf, "bogus": 1})


# ----------------------------------------------------------------------------------------------------------
# 2. HunyuanImage3.from_pretrained / save_pretrained; a pruned export loads back
# ----------------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=0)
def _hy_forward(graphdef, state, ids, lat, t, vl):
    return nnx.merge(graphdef, state)(ids, lat, t, vl)


def _hy(model, args) -> np.ndarray:
    model.set_moe_impl("dense")  # the reference MoE path: the same function, compiles in half the time on CPU
    graphdef, state = nnx.split(model)
    return np.asarray(_hy_forward(graphdef, state, *args))


def test_hunyuan_from_pretrained_save_pretrained_and_export(tmp_path):
    from converters.engine import CheckpointError
    from tmp_jax.models.hunyuan_image3 import TINY, HunyuanImage3, HunyuanImage3Config

    cfg = TINY.replace(
        num_hidden_layers=3,
        num_experts=4,
        moe_topk=2,
        moe_intermediate_size=32,
        num_shared_expert=1,
        vae={"latent_channels": 4},
    )
    rand = HH.init_random(cfg, jnp.float32, 3)
    src = tmp_path / "src"
    rand.save_pretrained(src)
    with pytest.raises(CheckpointError, match="exists"):
        rand.save_pretrained(src)  # like Z-Image's: an existing folder needs overwrite=True
    rand.save_pretrained(src, overwrite=True)
    model = HunyuanImage3.from_pretrained(src)
    assert isinstance(model, HunyuanImage3) and model.config == cfg
    b = HH.synthetic_calib(cfg, 2, 2, 0)[0]
    args = (b["input_ids"], b["latents"], b["timestep"], b["valid_lengths"])
    assert _hy(model, args).tobytes() == _hy(rand, args).tobytes()  # fp32 round trip: bit-identical

    tree = Tree(HH.build_spec(model.config))
    g = tree.full_genome()
    _put(tree, g, "model.layers.1:keep", 0)
    _put(tree, g, "tie:kv_groups", 1)
    _put(tree, g, "model.layers.0.mlp:experts", 3)
    _put(tree, g, "model.layers.0.mlp:expert_ffn", 8)
    _put(tree, g, "model.layers.2.mlp:expert_ffn", 16)
    order = _order(tree, 2)
    plan = write_plan(tmp_path / "plan.json", "hunyuan", src, model, tree, g, order)
    out = tmp_path / "pruned"
    export(ExportConfig(plan=plan, model=src, out=out, progress=False))
    small = materialize(model, tree, tree.decode(g), order)
    back = HunyuanImage3.from_pretrained(out)
    assert back.config == small.config
    assert back.config.num_experts == (3, 4) and back.config.moe_intermediate_size == (8, 16)
    assert back.config.layers_kept == (0, 2) and back.config.num_key_value_heads == 1
    assert _rel(_hy(back, args), _hy(small, args)) <= TOL
    with pytest.raises(ValueError, match="quantization_config"):  # int8 / fp8 exports: refused by name
        HunyuanImage3Config.from_hf_config({**back.config.to_hf_config(), "quantization_config": {}})


# ----------------------------------------------------------------------------------------------------------
# 3. export resolves the embedded names
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["zimage-fmnist", "hunyuan-fmnist"])
def test_export_cli_accepts_embedded_names(tmp_path, capsys, name):
    from converters.export import main
    from tmp_jax.problem import EMBEDDED

    folder = EMBEDDED[name]
    if not (folder / "config.json").is_file():
        pytest.skip(f"embedded model {name} not in this checkout")
    hooks = arch.detect(json.loads((folder / "config.json").read_text()))
    cfg = hooks.config_from_dict(json.loads((folder / "config.json").read_text()))
    tree = Tree(hooks.build_spec(cfg))
    g = tree.full_genome()
    g[next(i for i, x in enumerate(tree.genes) if x.name.endswith("layers.1:keep"))] = 0  # drop one block
    # the plan of that checkpoint (its fingerprint: config + safetensors headers; the weights are not read)
    plan = write_plan(tmp_path / "plan.json", hooks.name, folder, SimpleNamespace(config=cfg), tree, g, None)
    out = tmp_path / "out"
    rc = main(["--plan", str(plan), "--model", name, "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert (out / "config.json").is_file() and f"to {out}" in captured.out


# ----------------------------------------------------------------------------------------------------------
# 4. FLOP budgets count each architecture's own sequence
# ----------------------------------------------------------------------------------------------------------
def test_flops_budget_uses_the_architectures_tokens():
    from search.budget import CostModel
    from tmp_jax.models.hunyuan_image3.config import DEFAULT_TOKENS as HY_TOKENS
    from tmp_jax.models.hunyuan_image3.config import TINY as HTINY
    from tmp_jax.models.z_image import TINY as ZTINY
    from tmp_jax.models.z_image.config import DEFAULT_TOKENS as Z_TOKENS

    htree, ztree = Tree(HH.build_spec(HTINY)), Tree(ZH.build_spec(ZTINY))
    assert HY_TOKENS == {"all": 4096 + 128 + 5}  # 1024² image (4096 <img>), a 128-token prompt, 5 specials
    hy, z = CostModel(htree, "flops"), CostModel(ztree, "flops")
    assert hy.tokens == HY_TOKENS and z.tokens == Z_TOKENS
    full = htree.full_assignment()
    assert hy.full == htree.flops(full, HY_TOKENS) != htree.flops(full, Z_TOKENS)
    assert z.full == ztree.flops(ztree.full_assignment(), Z_TOKENS)
    assert CostModel(htree, "params").tokens == HY_TOKENS  # the plan's FLOP counts use them too


# ----------------------------------------------------------------------------------------------------------
# 5. a budget at or above the model's size fails at once
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget, bad", [("20B", "20B"), ("100%", "100%"), ("150%", "150%"), ("50%,1.0", "1.0")])
def test_search_refuses_budget_not_below_the_model(tmp_path, monkeypatch, capsys, budget, bad):
    from search import engine
    from tmp_jax.problem import EMBEDDED
    from tmp_jax.search import main

    if not (EMBEDDED["zimage-fmnist"] / "config.json").is_file():
        pytest.skip("embedded model zimage-fmnist not in this checkout")

    def no_search(cfg):
        raise AssertionError("the budget must be refused before the model is loaded or calibrated")

    monkeypatch.setattr(engine, "_build_problem", no_search)
    rc = main(["--budget", budget, "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"--budget {bad} is at least the model's" in err and "nothing to prune" in err
    assert "M params" in err  # the model's size (5.1M parameters)
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.parametrize("kind", ["pruned", "quantized"])
def test_search_on_an_export_it_cannot_prune_is_one_line(tmp_path, monkeypatch, capsys, kind):
    """A pruned or a --quantize export given to the search: a one-line error naming the file, before any work."""
    from search import engine
    from tmp_jax.models.z_image import TINY
    from tmp_jax.search import main

    hooks = arch.get("zimage")
    tree = Tree(hooks.build_spec(TINY))
    g = tree.full_genome()
    g[[i for i, x in enumerate(tree.genes) if x.kind == "ffn"]] = 1  # every FFN at its smallest level
    cfg = hooks.pruned_config(TINY, tree, tree.decode(g)).to_hf_config()
    if kind == "quantized":
        cfg = {**TINY.to_hf_config(), "quantization_config": {"quant_method": "tmp_jax", "dtype": "int8"}}
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))

    def no_search(cfg):
        raise AssertionError("the model must be refused before it is loaded or calibrated")

    monkeypatch.setattr(engine, "_build_problem", no_search)
    rc = main(["--model", str(folder), "--budget", "50%", "--out", str(tmp_path / "s"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert str(folder / "config.json") in err
    assert ("pruned checkpoint" if kind == "pruned" else "quantization_config") in err


# ----------------------------------------------------------------------------------------------------------
# 6. progress bars in a log
# ----------------------------------------------------------------------------------------------------------
def test_progress_bar_in_a_log_is_plain_timed_lines(monkeypatch):
    from tmp_jax import progress

    log = io.StringIO()  # not a terminal
    for _ in progress.progress_bar(range(20_000), file=log, desc="calibration", unit="batch"):
        pass
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and len(lines) == 2  # first and final state only (< 10 s)
    assert "20000/20000" in lines[-1]

    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.05)
    log = io.StringIO()
    bar = progress.progress_bar(total=150, file=log, desc="distill", unit="step", leave=False, dynamic_ncols=True)
    t0 = time.perf_counter()
    for i in range(150):
        time.sleep(0.002)
        bar.set_postfix(loss=f"{1 / (i + 1):.4g}")  # every step, as distill does: must not print a line each
        bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - t0
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and all(ln.startswith("distill") for ln in lines)
    assert 3 <= len(lines) <= elapsed / 0.05 + 3 and "150/150" in lines[-1]  # timed lines + first + final


def test_progress_bar_on_a_terminal_is_tqdm(monkeypatch):
    from tqdm.auto import tqdm

    from tmp_jax import progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = progress.progress_bar(total=3, file=Tty(), desc="x")
    assert isinstance(bar, tqdm) and not isinstance(bar, progress._LogBar)
    bar.close()
