"""Export of a HunyuanImage-3.0 plan to the OFFICIAL layout: the pruned folder loads in nemo-automodel's
``HunyuanImage3ForCausalMM`` (directly for uniform layers, per-layer blocks otherwise) and its forward equals the
JAX materialised model (our own loader reading it back: tests/test_contract.py); VAE / vision tensors and
non-weight files are carried over unchanged, layers are renumbered, re-running is byte-identical, and a plan
from another model is refused.

The source is a tiny official-layout checkpoint folder: a random nemo model converted with its own
``state_dict_adapter.to_hf``, written as two shards + index, with dummy VAE / vision tensors, a tokenizer,
a generation_config.json, a remote-code ``*.py`` and an assets sub-folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nemo_automodel")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from nemo_automodel.components.models.common import BackendConfig  # noqa: E402
from nemo_automodel.components.models.hunyuan_image3.config import (  # noqa: E402
    HunyuanImage3Config as NemoConfig,
)
from nemo_automodel.components.models.hunyuan_image3.model import (  # noqa: E402
    HunyuanImage3Block,
    HunyuanImage3ForCausalMM,
    build_moe_config,
)
from nemo_automodel.components.models.hunyuan_image3.state_dict_adapter import (  # noqa: E402
    HunyuanImage3StateDictAdapter,
)
from plan_ref import write_plan  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from test_hunyuan_parity import (  # noqa: E402
    KW_A,
    PER_LAYER,
    build_reference,
    rel_errs,
    renormalised_top1,  # noqa: F401  (autouse: nemo's top-1 renormalisation patch, here too)
    t2i_inputs,
)

from converters.engine import SafetensorsReader  # noqa: E402
from converters.export import ExportConfig, export, main  # noqa: E402
from converters.hunyuan import PASSTHROUGH_PREFIXES, load_hunyuan  # noqa: E402
from tmp_jax import arch  # noqa: E402
from tmp_jax.materialize import count_params, materialize  # noqa: E402
from tmp_jax.tree import Tree  # noqa: E402

pytestmark = [
    pytest.mark.torch,
    # nemo's config hands the release's rope_scaling (type "custom") to transformers, which only warns
    pytest.mark.filterwarnings("ignore:`rope_scaling` is deprecated:FutureWarning"),
]
H = arch.get("hunyuan")
TOL = 1e-5
# 3 layers; 4 KV groups of 2 query heads; 6 experts of width 16, top-2, 2 shared experts (shared width 32,
# so expert widths 1..16 dividing 32 are allowed); 4 latent channels. The release writes moe_topk etc. as lists.
KW = {
    **KW_A,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "num_experts": 6,
    "moe_topk": [2, 2, 2],
    "moe_intermediate_size": [16, 16, 16],
    "num_shared_expert": [2, 2, 2],
    "vae": {"latent_channels": 4},
}
CONFIG_EXTRA = {
    "architectures": ["HunyuanImage3ForCausalMM"],
    "model_type": "hunyuan_image_3_moe",
    "auto_map": {
        "AutoConfig": "configuration_hunyuan_image_3.HunyuanImage3Config",
        "AutoModelForCausalLM": "modeling_hunyuan_image_3.HunyuanImage3ForCausalMM",
    },
    "rope_scaling": {"type": "custom", "factor": 1.0, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0},
    "rope_type": "2d",
    "moe_layer_num_skipped": 0,
    "cond_image_type": "vae_vit",
}
EXTRA_FILES = {
    "tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
    "generation_config.json": '{"do_sample": false, "diff_infer_steps": 50}',
    "modeling_hunyuan_image_3.py": "# remote code (dummy)\nclass HunyuanImage3ForCausalMM: ...\n",
    "assets/README.txt": "carried over\n",
}
PASSTHROUGH = {
    "vae.decoder.conv_out.weight": np.arange(3 * 4 * 27, dtype=np.float32).reshape(3, 4, 3, 3, 3),
    "vae.encoder.conv_in.bias": np.linspace(-1, 1, 7).astype(np.float16),
    "vision_model.embeddings.patch_embedding.weight": np.random.default_rng(0).standard_normal((8, 8), np.float32),
    "vision_aligner.layers.0.weight": np.full((8, 8), 0.25, np.float32),
}
BACKEND = dict(attn="sdpa", linear="torch", experts="torch", dispatcher="torch")


def write_official(folder: Path, official: dict[str, np.ndarray], conf: dict) -> Path:
    """An official-layout folder: two shards + index, config.json, passthrough tensors, extra files."""
    folder.mkdir(parents=True)
    sd = {**official, **PASSTHROUGH}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(folder / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    for name, text in EXTRA_FILES.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    (folder / ".cache").mkdir()  # a download cache: not part of the model, not copied
    (folder / ".cache" / "x.lock").write_text("")
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    _, official = build_reference(KW, seed=3)
    conf = {**CONFIG_EXTRA, **KW}
    folder = write_official(tmp_path_factory.mktemp("hy_src") / "HunyuanImage-3.0", official, conf)
    model = load_hunyuan(folder)
    tree = Tree(H.build_spec(model.config))
    return folder, model, tree


def _plan(tmp: Path, folder: Path, model, tree, genome, order) -> Path:
    return write_plan(tmp / "plan.json", "hunyuan", folder, model, tree, genome, order)


def _genome(tree, kind: str):
    g = tree.full_genome()
    genes = {x.name: (i, x) for i, x in enumerate(tree.genes)}

    def put(name, count):
        i, gene = genes[name]
        g[i] = gene.counts.index(count)

    put("model.layers.1:keep", 0)  # both cases drop the middle layer: layer 2 becomes layer 1
    if kind == "hetero":  # 2 of 4 KV groups; per layer 3 experts of width 8 / 5 experts of width 4
        put("tie:kv_groups", 2)
        put("model.layers.0.mlp:experts", 3)
        put("model.layers.0.mlp:expert_ffn", 8)
        put("model.layers.2.mlp:experts", 5)
        put("model.layers.2.mlp:expert_ffn", 4)
    return g


# ----------------------------------------------------------------------------------------------------------
# The PyTorch reference, loaded from the exported folder
# ----------------------------------------------------------------------------------------------------------
def nemo_from_folder(folder: Path) -> HunyuanImage3ForCausalMM:
    """nemo's model for the exported config.json with the exported tensors (strict load). Uniform layers go
    through the stock path (config from_pretrained + ``state_dict_adapter.from_hf``); per-layer MoE lists
    through one block + adapter per layer (nemo 0.7.0 has no per-layer lists)."""
    conf = json.loads((folder / "config.json").read_text())
    n = conf["num_hidden_layers"]
    backend = BackendConfig(**BACKEND, gate_precision=torch.float32)
    reader = SafetensorsReader(folder)
    hf = {k: torch.from_numpy(reader.read(k)) for k in reader.keys()}
    uniform = all(len(set(conf[f])) == 1 for f in PER_LAYER if isinstance(conf[f], list))
    if uniform:
        model = HunyuanImage3ForCausalMM(NemoConfig.from_pretrained(str(folder)), backend=backend)
        model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
        native = model.state_dict_adapter.from_hf(hf)
    else:
        cfgs = [NemoConfig(**{k: (v[i] if k in PER_LAYER else v) for k, v in conf.items()}) for i in range(n)]
        moes = [build_moe_config(c) for c in cfgs]
        model = HunyuanImage3ForCausalMM(cfgs[0], backend=backend)
        for i in range(1, n):
            model.model.layers[str(i)] = HunyuanImage3Block(cfgs[i], moes[i], backend, torch.float32)
        model.initialize_weights(buffer_device=torch.device("cpu"), dtype=torch.float32)
        adapters = [HunyuanImage3StateDictAdapter(c, m, backend, dtype=torch.float32) for c, m in zip(cfgs, moes)]
        groups: dict[int, dict] = {}
        for k, v in hf.items():
            m = re.match(r"model\.layers\.(\d+)\.", k)
            groups.setdefault(int(m.group(1)) if m else 0, {})[k] = v
        native = {}
        for i, part in groups.items():
            native.update(adapters[i].from_hf(part))
    missing, unexpected = model.load_state_dict(native, strict=True)
    assert not missing and not unexpected
    return model.eval()


def forward_fn(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, ids, lat, t, vl: nnx.merge(graphdef, s)(ids, lat, t, vl))
    return graphdef, lambda m, *a: np.asarray(f(nnx.state(m), *a))


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["layer_drop", "hetero"])
def test_export_official_layout(tmp_path, src, kind):
    folder, model, tree = src
    rng = np.random.default_rng(1)
    # expert channels: one random order per expert (Units.batch), so every expert keeps different channels
    order = {
        (n.name, u.kind): rng.permutation(u.n)
        if u.batch is None
        else np.stack([rng.permutation(u.n) for _ in range(tree.units(n.name, u.batch).n)])
        for n in tree.spec.nodes()
        for u in n.units
    }
    g = _genome(tree, kind)
    plan = _plan(tmp_path, folder, model, tree, g, order)
    out = tmp_path / "pruned"
    res = export(ExportConfig(plan=plan, model=folder, out=out, progress=False, max_shard_bytes=100_000))
    a = tree.decode(g)
    small = materialize(model, tree, a, order)

    # parameter count == the plan's; sharded official names + index
    assert res["params_after"] == res["plan_params_after"] == count_params(small) == tree.count(a)["params"]
    assert len(res["files"]) > 1 and all(re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", f) for f in res["files"])
    assert (out / "model.safetensors.index.json").is_file()
    ord_, srd = SafetensorsReader(out), SafetensorsReader(folder)
    ported = [k for k in ord_.keys() if not k.startswith(PASSTHROUGH_PREFIXES)]
    assert sum(int(np.prod(ord_.infos[k].shape)) for k in ported) == res["params_after"]

    # config.json: the source's with the pruned fields lowered, everything else kept
    src_conf, conf = json.loads((folder / "config.json").read_text()), json.loads((out / "config.json").read_text())
    new = small.config
    assert conf["num_hidden_layers"] == 2 and conf["layers_kept"] == [0, 2] == list(new.layers_kept)
    for f in PER_LAYER:
        assert conf[f] == list(getattr(new, f))
    assert (conf["num_attention_heads"], conf["num_key_value_heads"]) == (
        new.num_attention_heads,
        new.num_key_value_heads,
    )
    changed = {"num_hidden_layers", *PER_LAYER, "num_attention_heads", "num_key_value_heads", "layers_kept"}
    assert {k: v for k, v in conf.items() if k not in changed} == {
        k: v for k, v in src_conf.items() if k not in changed
    }
    assert list(conf)[: len(src_conf)] == list(src_conf)  # the source's key order
    if kind == "hetero":
        assert conf["num_experts"] == [3, 5] and conf["moe_intermediate_size"] == [8, 4]
        assert conf["num_shared_expert"] == [4, 8] and conf["num_key_value_heads"] == 2
        assert conf["num_attention_heads"] == 4
    else:
        assert conf["num_experts"] == [6, 6] and conf["num_key_value_heads"] == 4

    # passthrough tensors and non-weight files carried over unchanged; nothing else added
    for k, v in PASSTHROUGH.items():
        got = ord_.read(k)
        assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), k
    for name in EXTRA_FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", *res["files"], *{n.split("/")[0] for n in EXTRA_FILES}]
    )
    # layers renumbered: new layer 1 is source layer 2 (a norm is never sliced)
    key = "model.layers.{}.post_attention_layernorm.weight"
    assert ord_.read(key.format(1)).tobytes() == srd.read(key.format(2)).tobytes()
    # router rows and expert blocks follow the kept experts; up / gate halves and down columns share the widths
    kept = json.loads(plan.read_text())["policy"]["kept_units"]
    ex, ch = np.asarray(kept["model.layers.2.mlp/experts"]), np.asarray(kept["model.layers.2.mlp/expert_ffn"])
    wg = "model.layers.{}.mlp.gate.wg.weight"
    np.testing.assert_array_equal(ord_.read(wg.format(1)), srd.read(wg.format(2))[ex])
    inter = KW["moe_intermediate_size"][2]
    assert ch.shape == (KW["num_experts"], np.shape(ch)[-1])  # one kept list per (source) expert
    if kind == "hetero":  # the experts kept different channels
        assert len({tuple(ch[e]) for e in ex}) > 1
    for j, e in enumerate(ex):
        gu = srd.read(f"model.layers.2.mlp.experts.{e}.gate_and_up_proj.weight")
        np.testing.assert_array_equal(
            ord_.read(f"model.layers.1.mlp.experts.{j}.gate_and_up_proj.weight"),
            np.concatenate([gu[:inter][ch[e]], gu[inter:][ch[e]]]),
        )
        np.testing.assert_array_equal(
            ord_.read(f"model.layers.1.mlp.experts.{j}.down_proj.weight"),
            srd.read(f"model.layers.2.mlp.experts.{e}.down_proj.weight")[:, ch[e]],
        )

    # (our loader reading the export back: tests/test_contract.py, for every architecture)
    ids, lat, t, vl = t2i_inputs(np.random.default_rng(7), (4, 8), (3, 2), 4, extra_pad=1)
    _, fwd = forward_fn(small)
    y_jax = fwd(small, ids, lat, t, vl)

    # the PyTorch reference loads the exported folder and computes the same
    ref = nemo_from_folder(out)
    assert sum(p.numel() for p in ref.parameters()) == res["params_after"]
    with torch.no_grad():
        y_ref = ref(*(torch.from_numpy(x) for x in (ids, lat, t, vl)))[0].numpy()
    assert y_ref.shape == y_jax.shape == lat.shape
    assert max(rel_errs(y_ref, y_jax)) <= TOL, rel_errs(y_ref, y_jax)

    # re-running gives byte-identical files
    out2 = tmp_path / "again"
    export(ExportConfig(plan=plan, model=folder, out=out2, progress=False, max_shard_bytes=100_000))
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out2) for p in out2.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (out2 / f).read_bytes(), f


def test_export_refuses_other_model(tmp_path, src, capsys):
    folder, model, tree = src
    plan = _plan(tmp_path, folder, model, tree, _genome(tree, "layer_drop"), None)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    conf = json.loads((other / "config.json").read_text())
    conf["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(conf))
    assert main(["--plan", str(plan), "--model", str(other), "--out", str(tmp_path / "o1")]) == 2
    assert "does not match the plan's source" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists()
    # the exporter's fingerprint of the right source is the one build_problem records
    assert main(["--plan", str(plan), "--model", str(folder), "--out", str(tmp_path / "o2"), "--dtype", "bf16"]) == 0
    conf = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert conf["torch_dtype"] == "bfloat16" and conf["layers_kept"] == [0, 2]
    rd = SafetensorsReader(tmp_path / "o2")
    assert rd.infos["model.wte.weight"].dtype == "BF16" and rd.infos["vae.encoder.conv_in.bias"].dtype == "F16"
