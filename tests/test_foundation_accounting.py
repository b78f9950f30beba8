"""Parameter and FLOP accounting against counts derived by hand (the arithmetic is written out here, weight by
weight and matmul by matmul, independently of medscale.accounting's formulas)."""

import pytest

from medscale import accounting
from medscale.errors import UserError
from medscale.spec import ModalitySpec, ModelSpec

# ---------------------------------------------------------------- config A: GELU
# d=8, 2 encoder layers, 1 decoder layer, 2 heads (head_dim 4), d_ff=16, two modalities:
# image (vocab 5, 2x2 grid) and caption (vocab 7): V_total = 12, M = 2. Le=6, Ld=4, batch 3.
GELU = ModelSpec(d_model=8, enc_layers=2, dec_layers=1, num_heads=2, d_ff=16, mlp="gelu",
                 modalities=(ModalitySpec("image", "image", 5, 4, (2, 2)),
                             ModalitySpec("caption", "sequence", 7, 3)),
                 enc_len=6, dec_len=4)

# ---------------------------------------------------------------- config B: SwiGLU
# d=12, 1 encoder layer, 2 decoder layers, 3 heads (head_dim 4), d_ff=20, three modalities:
# image (vocab 6, 1x2), caption (vocab 9), segmentation (vocab 4, 1x2): V_total = 19, M = 3. Le=5, Ld=7, batch 2.
SWIGLU = ModelSpec(d_model=12, enc_layers=1, dec_layers=2, num_heads=3, d_ff=20, mlp="swiglu",
                   modalities=(ModalitySpec("image", "image", 6, 2, (1, 2)),
                               ModalitySpec("caption", "sequence", 9, 5),
                               ModalitySpec("segmentation", "image", 4, 2, (1, 2))),
                   enc_len=5, dec_len=7)


def test_params_gelu_by_hand():
    token_table = 12 * 8  # [V_total, d]
    modality_tables = 2 * (2 * 8)  # encoder and decoder [M, d]
    mask_vector = 8
    ln = 8 + 8  # scale + bias
    enc_layer = ln + (8 * 8) * 4 + ln + (8 * 16 + 16 * 8)  # LN, q k v o, LN, up + down
    dec_layer = ln + (8 * 8) * 4 + ln + (8 * 8) * 4 + ln + (8 * 16 + 16 * 8)  # LN, self, LN, cross, LN, MLP
    heads = 8 * 12
    embedding = token_table + modality_tables + mask_vector
    non_embedding = 2 * enc_layer + ln + 1 * dec_layer + ln  # two final LayerNorms
    assert (embedding, non_embedding, heads) == (136, 1936, 96)
    assert accounting.param_counts(GELU) == {"total": embedding + non_embedding + heads, "embedding": embedding,
                                             "non_embedding": non_embedding, "heads": heads}


def test_params_swiglu_by_hand():
    ln = 12 + 12
    mlp = 12 * 20 + 12 * 20 + 20 * 12  # gate, up, down
    enc_layer = ln + 4 * 144 + ln + mlp
    dec_layer = ln + 4 * 144 + ln + 4 * 144 + ln + mlp
    embedding = 19 * 12 + 2 * 3 * 12 + 12
    heads = 12 * 19
    non_embedding = enc_layer + ln + 2 * dec_layer + ln
    assert non_embedding == 1 * (48 + 576 + 720) + 24 + 2 * (72 + 1152 + 720) + 24
    counts = accounting.param_counts(SWIGLU)
    assert counts == {"total": embedding + non_embedding + heads, "embedding": embedding,
                      "non_embedding": non_embedding, "heads": heads}


def _mm(m, k, n):
    """FLOPs of an [m, k] x [k, n] matmul."""
    return 2 * m * k * n


def test_flops_gelu_by_hand():
    B, Le, Ld, d, f, V, H, dh = 3, 6, 4, 8, 16, 12, 2, 4
    fwd = {
        # 2 encoder layers: q, k, v, o on B*Le tokens
        "enc_attn_proj": 2 * 4 * _mm(B * Le, d, d),
        # per head: scores [Le, dh] x [dh, Le], then probs [Le, Le] x [Le, dh]
        "enc_attn_scores": 2 * B * H * (_mm(Le, dh, Le) + _mm(Le, Le, dh)),
        "enc_mlp": 2 * (_mm(B * Le, d, f) + _mm(B * Le, f, d)),
        # 1 decoder layer
        "dec_self_proj": 1 * 4 * _mm(B * Ld, d, d),
        "dec_self_scores": 1 * B * H * (_mm(Ld, dh, Ld) + _mm(Ld, Ld, dh)),
        "cross_proj": 1 * (2 * _mm(B * Ld, d, d) + 2 * _mm(B * Le, d, d)),  # q, o on dec; k, v on enc tokens
        "cross_scores": 1 * B * H * (_mm(Ld, dh, Le) + _mm(Ld, Le, dh)),
        "dec_mlp": 1 * (_mm(B * Ld, d, f) + _mm(B * Ld, f, d)),
        "heads": _mm(B * Ld, d, V),
    }
    assert fwd["enc_attn_proj"] == 18432 and fwd["heads"] == 2304
    out = accounting.step_flops(GELU, B)
    hw = {k: 3 * v for k, v in fwd.items()}
    model = dict(hw, dec_self_scores=hw["dec_self_scores"] // 2)
    assert out["hardware_components"] == hw
    assert out["components"] == model
    assert out["model_flops"] == sum(model.values())
    assert out["hardware_flops"] == sum(hw.values())
    tokens = B * (Le + Ld)
    assert accounting.flops_per_token(GELU, B) == pytest.approx(sum(model.values()) / tokens)
    assert accounting.ratio_to_6nd(GELU, B) == pytest.approx(sum(model.values()) / (6 * 1936 * tokens))


def test_flops_swiglu_by_hand_with_remat_and_local():
    B, Le, Ld, d, f, V, H, dh = 2, 5, 7, 12, 20, 19, 3, 4
    fwd = {
        "enc_attn_proj": 1 * 4 * _mm(B * Le, d, d),
        "enc_attn_scores": 1 * B * H * (_mm(Le, dh, Le) + _mm(Le, Le, dh)),
        "enc_mlp": 1 * (2 * _mm(B * Le, d, f) + _mm(B * Le, f, d)),  # gate and up, down
        "dec_self_proj": 2 * 4 * _mm(B * Ld, d, d),
        "dec_self_scores": 2 * B * H * (_mm(Ld, dh, Ld) + _mm(Ld, Ld, dh)),
        "cross_proj": 2 * (2 * _mm(B * Ld, d, d) + 2 * _mm(B * Le, d, d)),
        "cross_scores": 2 * B * H * (_mm(Ld, dh, Le) + _mm(Ld, Le, dh)),
        "dec_mlp": 2 * (2 * _mm(B * Ld, d, f) + _mm(B * Ld, f, d)),
        "heads": _mm(B * Ld, d, V),
    }
    out = accounting.step_flops(SWIGLU, B)
    assert out["hardware_components"] == {k: 3 * v for k, v in fwd.items()}
    assert out["model_flops"] == 3 * sum(fwd.values()) - 3 * fwd["dec_self_scores"] // 2

    # remat full: one more forward of the layer stacks, not of the heads; model FLOPs unchanged
    full = accounting.step_flops(SWIGLU, B, remat="full")
    assert full["model_flops"] == out["model_flops"]
    assert full["hardware_flops"] == 4 * sum(fwd.values()) - fwd["heads"]
    # save_dots recomputes no matmul
    assert accounting.step_flops(SWIGLU, B, remat="save_dots") == out

    # local attention, window 3 (< Le = 5): each encoder query sees 3 keys
    local = accounting.step_flops(SWIGLU, B, attention="local", window=3)
    assert local["hardware_components"]["enc_attn_scores"] == 3 * 1 * B * H * (_mm(Le, dh, 3) + _mm(Le, 3, dh))
    assert local["hardware_components"]["cross_scores"] == out["hardware_components"]["cross_scores"]
    wide = accounting.step_flops(SWIGLU, B, attention="local", window=100)  # window beyond Le: dense
    assert wide == out
    for impl in ("xla", "cudnn", "blockwise"):  # dense scores in full, whatever the kernel
        assert accounting.step_flops(SWIGLU, B, attention=impl) == out


def test_encoder_and_decoder_tokens_are_separate():
    base = accounting.step_flops(GELU, 3)["components"]
    longer_dec = accounting.step_flops(GELU.replace(dec_len=40), 3)["components"]
    for k in ("enc_attn_proj", "enc_attn_scores", "enc_mlp"):
        assert longer_dec[k] == base[k], k
    for k in ("dec_self_proj", "dec_mlp", "heads"):
        assert longer_dec[k] == 10 * base[k], k  # linear in decoder tokens
    longer_enc = accounting.step_flops(GELU.replace(enc_len=60), 3)["components"]
    for k in ("dec_self_proj", "dec_self_scores", "dec_mlp", "heads"):
        assert longer_enc[k] == base[k], k
    assert longer_enc["enc_mlp"] == 10 * base["enc_mlp"]
    # cross-attention: q, o follow decoder tokens, k, v encoder tokens
    B, d = 3, 8
    assert longer_enc["cross_proj"] - base["cross_proj"] == 3 * 4 * B * (60 - 6) * d * d


def test_flops_per_token_independent_of_batch():
    assert accounting.flops_per_token(SWIGLU, 1) == pytest.approx(accounting.flops_per_token(SWIGLU, 64))
    assert accounting.step_flops(SWIGLU, 8)["model_flops"] == 8 * accounting.step_flops(SWIGLU, 1)["model_flops"]


def test_bad_options_are_user_errors():
    with pytest.raises(UserError, match="remat"):
        accounting.step_flops(GELU, 2, remat="some")
    with pytest.raises(UserError, match="attention"):
        accounting.step_flops(GELU, 2, attention="flash9")
    with pytest.raises(UserError, match="window"):
        accounting.step_flops(GELU, 2, attention="local")
    with pytest.raises(UserError, match="batch"):
        accounting.step_flops(GELU, 0)


def test_ladder_spans_1e5_to_2e9_and_matches_configs():
    from medscale.configs import load_config, spec_from_config

    specs = accounting.ladder_specs()
    non_emb = [accounting.param_counts(s)["non_embedding"] for s in specs]
    assert non_emb == sorted(non_emb) and len(set(non_emb)) == len(non_emb)
    assert 0.8e5 <= non_emb[0] <= 2e5
    assert 1.5e9 <= non_emb[-1] <= 2.5e9
    # the budget's light ladder specs are the ones the base config builds
    for s in (specs[0], specs[6]):
        cfg = load_config("base", [f"model.size={s.name}"])
        assert accounting.param_counts(spec_from_config(cfg)) == accounting.param_counts(s)
