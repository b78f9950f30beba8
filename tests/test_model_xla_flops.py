"""XLA's FLOP count of the compiled train step agrees with the analytic hardware FLOPs within 5%, for both
encoder kinds (``model.encoder``: unified, per_modality)."""

import pytest

from medscale import accounting
from medscale.spec import ModelSpec, default_modalities
from medscale.train.step import xla_step_flops


@pytest.mark.parametrize("shape,batch,remat", [
    ({"d_model": 128, "enc_layers": 2, "dec_layers": 2, "num_heads": 2, "d_ff": 512}, 8, "none"),
    ({"d_model": 256, "enc_layers": 1, "dec_layers": 1, "num_heads": 4, "d_ff": 1024, "enc_len": 256, "dec_len": 64,
      "modalities": default_modalities(text_vocab=8192)}, 4, "none"),
    ({"d_model": 128, "enc_layers": 1, "dec_layers": 1, "num_heads": 2, "d_ff": 512}, 8, "full"),
    ({"d_model": 128, "enc_layers": 1, "dec_layers": 1, "num_heads": 2, "d_ff": 512, "encoder": "per_modality",
      "enc_split": (64, 32, 0, 32, 0, 0)}, 8, "none"),
    pytest.param({"d_model": 128, "enc_layers": 2, "dec_layers": 1, "num_heads": 2, "d_ff": 512,
                  "encoder": "per_modality"}, 8, "full", marks=pytest.mark.slow),
])
def test_xla_flops_within_5_percent_of_hardware_flops(shape, batch, remat):
    spec = ModelSpec(**shape)
    xla = xla_step_flops(spec, batch, remat=remat)
    hw = accounting.step_flops(spec, batch, remat=remat)["hardware_flops"]
    assert abs(xla / hw - 1) < 0.05, xla / hw
