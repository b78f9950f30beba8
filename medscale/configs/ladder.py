"""The model size ladder: named sizes from ~1e5 to ~2e9 non-embedding parameters.

Rule (depth and width grown together at a fixed aspect ratio): a size of depth L has L encoder and L decoder
layers, d_model = 64 * L, d_ff = 4 * d_model, GELU MLP, heads = max(2, d_model / 64) (head_dim 64, or 32 for
the smallest). Non-embedding parameters are then about 28 * d_model^2 * L (12 d^2 per encoder layer, 16 d^2
per decoder layer), i.e. ~1.15e5 * L^3. Exact counts: ``medscale flops --size NAME``.
"""

from __future__ import annotations

from medscale.errors import UserError

DEPTHS = {
    "tiny": 1, "mini": 2, "xxs": 3, "xs": 4, "small": 5, "medium": 6, "base": 8, "large": 10,
    "xl": 12, "2xl": 16, "3xl": 20, "4xl": 24, "5xl": 26,
}


def ladder_shape(name: str) -> dict:
    """Shape fields of a ladder size: d_model, enc_layers, dec_layers, num_heads, d_ff, mlp."""
    if name not in DEPTHS:
        raise UserError(f"unknown size {name!r}; known sizes: {', '.join(DEPTHS)}")
    depth = DEPTHS[name]
    d_model = 64 * depth
    return {"d_model": d_model, "enc_layers": depth, "dec_layers": depth,
            "num_heads": max(2, d_model // 64), "d_ff": 4 * d_model, "mlp": "gelu"}


def ladder_names() -> list[str]:
    return list(DEPTHS)
