"""User-facing defects, one test each (every one fails without its fix):

1. a heterogeneous Z-Image config (per-block widths) with Hugging Face metadata keys (``auto_map``, ...) loads
   back; ``quantization_config`` is refused by name;
2. ``HunyuanImage3.from_pretrained`` / ``save_pretrained`` exist and a pruned config (per-layer expert counts /
   widths, ``layers_kept``) loads back; ``quantization_config`` is refused by name;
   (the round trips through an export, for every architecture: ``tests/test_contract.py``)
3. ``python -m converters.export --model zimage-fmnist`` resolves the embedded names like search / evaluate;
4. a FLOP budget counts each architecture's own sequence (HunyuanImage's joint sequence, not Z-Image's);
5. ``python -m tmp_jax.search --budget`` at or above the model's size fails at once, naming the budget;
6. progress bars written to a log (not a terminal) are plain lines, no carriage returns, a bounded number.

Tiny configs and models only (no torch), a few seconds each.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from plan_ref import write_plan

from tmp_jax import arch
from tmp_jax.tree import Tree

ZH, HH = arch.get("zimage"), arch.get("hunyuan")


def _put(tree: Tree, g: np.ndarray, name: str, count: int) -> None:
    i = [x.name for x in tree.genes].index(name)
    g[i] = tree.genes[i].counts.index(count)


# ----------------------------------------------------------------------------------------------------------
# 1. / 2. the configs of pruned exports load back; HF metadata keys are ignored, quantisation refused by name.
# The round trips themselves (save_pretrained / from_pretrained, a heterogeneous export with a dropped block
# loaded back by ZImageTransformer / HunyuanImage3.from_pretrained and tmp_jax.evaluate with the pruned
# model's outputs, the export's progress bar in a log) run for every architecture in tests/test_contract.py.
# ----------------------------------------------------------------------------------------------------------
HF_META = {
    "auto_map": {"AutoModel": "m.C"},
    "architectures": ["ZImagePrunedTransformer2DModel"],
    "transformers_version": "5.0",
    "torch_dtype": "float32",
    "_class_name": "ZImagePrunedTransformer2DModel",
    "_diffusers_version": "0.36.0",
    "_name_or_path": "x",
}


def _pruned_config(hooks, cfg, edits: dict):
    """The pruned config of ``cfg`` with the genes in ``edits`` at these counts (abstract: nothing runs)."""
    tree = Tree(hooks.build_spec(cfg))
    g = tree.full_genome()
    for name, count in edits.items():
        _put(tree, g, name, count)
    return hooks.pruned_config(cfg, tree, tree.decode(g))


def test_zimage_pruned_config_with_hf_metadata_loads_back():
    from tmp_jax.models.z_image import TINY
    from tmp_jax.models.z_image.config import ZImageConfig

    small = _pruned_config(
        ZH,
        TINY.replace(n_layers=3, n_refiner_layers=2),
        {"layers.1:keep": 0, "layers.2.attention:heads": 1, "context_refiner.1.attention:heads": 0},
    )
    assert small.is_pruned
    conf = small.to_hf_config()
    assert ZImageConfig.from_hf_config({**conf, **HF_META}) == small
    with pytest.raises(ValueError, match="quantization_config") as e:
        ZImageConfig.from_hf_config({**conf, "quantization_config": {"quant_method": "tmp-jax"}})
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown Z-Image field 'bogus'"):
        ZImageConfig.from_hf_config({**conf, "bogus": 1})


def test_hunyuan_pruned_config_loads_back_and_refuses_quantization():
    from tmp_jax.models.hunyuan_image3 import TINY, HunyuanImage3, HunyuanImage3Config

    assert callable(HunyuanImage3.from_pretrained) and callable(HunyuanImage3.save_pretrained)
    cfg = TINY.replace(
        num_hidden_layers=3,
        num_experts=4,
        moe_topk=2,
        moe_intermediate_size=32,
        num_shared_expert=1,
        vae={"latent_channels": 4},
    )
    small = _pruned_config(
        HH,
        cfg,
        {"model.layers.1:keep": 0, "model.layers.0.mlp:experts": 3, "model.layers.0.mlp:expert_ffn": 8},
    )
    assert small.num_experts == (3, 4) and small.moe_intermediate_size == (8, 32) and small.layers_kept == (0, 2)
    conf = {"architectures": ["HunyuanImage3ForCausalMM"], "model_type": "hunyuan_image_3_moe"}
    assert HunyuanImage3Config.from_hf_config({**conf, **small.to_hf_config()}) == small
    with pytest.raises(ValueError, match="quantization_config"):  # int8 / fp8 exports: refused by name
        HunyuanImage3Config.from_hf_config({**small.to_hf_config(), "quantization_config": {}})


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


def test_tools_that_take_a_plan_default_to_its_embedded_teacher(tmp_path, monkeypatch, capsys):
    """``reconstruct --plan P`` (and distill's) without ``--model`` loads the embedded teacher P was searched on,
    not always the default one: a plan of the MoE used to fail with "plan is for 'hunyuan', --model is 'zimage'"."""
    from tmp_jax import plan as plan_mod
    from tmp_jax import reconstruct
    from tmp_jax.teachers import ASSETS, DEFAULT_MODEL, EMBEDDED, plan_teacher

    def plan_file(**source) -> Path:
        plan = {k: {} for k in plan_mod._REQUIRED}
        plan.update(format_version=plan_mod.READ_VERSIONS[-1], arch="x", **source)
        path = tmp_path / "plan.json"
        path.write_text(json.dumps(plan))
        return path

    for name in EMBEDDED:
        assert plan_teacher(plan_file(source={"path": str(ASSETS / name)})) == name
        assert plan_teacher(plan_file(source={"path": f"/data/{name}"})) is None  # a user's folder of that name
    assert plan_teacher(plan_file(source={"path": "/data/my-model"})) is None
    assert plan_teacher(plan_file()) is None and plan_teacher(plan_file(source="x")) is None
    assert plan_teacher(tmp_path / "nope.json") is None  # unreadable: the tool's own load reports it

    other = next(n for n in EMBEDDED if n != DEFAULT_MODEL)
    path = plan_file(source={"path": str(ASSETS / other)})
    seen = {}

    def stop(a, *rest):
        seen["model"] = a.model
        raise ValueError("stop here")

    monkeypatch.setattr(reconstruct, "_run_in_memory", stop)
    args = ["--plan", str(path), "--out", str(tmp_path / "o"), "--streamed", "off", "--no-progress"]
    assert reconstruct.main(args) == 2 and "stop here" in capsys.readouterr().err
    assert seen["model"] == other
    assert reconstruct.main([*args[:2], "--model", DEFAULT_MODEL, *args[2:]]) == 2
    assert seen["model"] == DEFAULT_MODEL  # an explicit --model wins
