"""The committed HunyuanImage Fashion-MNIST teacher loads strictly into nemo-automodel's
``HunyuanImage3ForCausalMM`` (the PyTorch reference) from its official-layout folder and predicts the same
velocity as our model on real noised training inputs."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nemo_automodel")

import jax.numpy as jnp  # noqa: E402
from test_export_hunyuan import nemo_from_folder  # noqa: E402
from test_hunyuan_parity import rel_errs  # noqa: E402

from converters.hunyuan import load_hunyuan  # noqa: E402
from tmp_jax.models.hunyuan_image3.train import FMNIST_CONFIG, save, training_batch  # noqa: E402
from tmp_jax.problem import EMBEDDED  # noqa: E402

TOL = 1e-5


def test_teacher_matches_nemo(tmp_path):
    ours = load_hunyuan(EMBEDDED["hunyuan-fmnist"], dtype=jnp.float32)
    # the committed file is bf16 (torch.from_numpy has no bfloat16): the same values re-saved in fp32 by our
    # official-layout writer, which is also what distillation writes
    save(ours, tmp_path / "fp32")
    ref = nemo_from_folder(tmp_path / "fp32")
    assert sum(p.numel() for p in ref.parameters()) == 4_852_676
    b = training_batch(FMNIST_CONFIG, None, 3, 0, 0)
    args = [b[k] for k in ("input_ids", "latents", "timestep", "valid_lengths")]
    with torch.no_grad():
        y_ref = ref(*(torch.from_numpy(np.asarray(x)) for x in args))[0].numpy()
    y = np.asarray(ours(*args))
    assert y.shape == y_ref.shape == (3, 4, 14, 14)
    assert max(rel_errs(y_ref, y)) <= TOL, rel_errs(y_ref, y)
