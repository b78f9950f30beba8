"""The batch contract between the data pipeline, the model, training and generation.

A batch is a dict of numpy (host) or jax (device) arrays with fixed shapes; B = batch, Le = encoder length,
Ld = decoder length (``ModelSpec.enc_len`` / ``dec_len``). Token ids are *local* to their modality's
vocabulary (0 .. vocab_size-1); the model adds the modality's offset into the combined table.

| key            | dtype | shape   | meaning |
|----------------|-------|---------|---------|
| enc_tokens     | int32 | [B, Le] | input token ids |
| enc_modality   | int32 | [B, Le] | modality index into ``ModelSpec.modalities`` |
| enc_pos        | int32 | [B, Le] | position within the modality (image-like: row * grid_w + col; sequence: 0, 1, ...) |
| enc_valid      | bool  | [B, Le] | real token (False: padding; ids, modality and pos are 0 there) |
| dec_input      | int32 | [B, Ld] | decoder input ids: for sequence targets the previous target token of the same segment (the modality's start id at the segment's first position); 0 and ignored at image-like targets (the model uses its mask vector) |
| dec_target     | int32 | [B, Ld] | ids to predict |
| dec_modality   | int32 | [B, Ld] | modality index |
| dec_pos        | int32 | [B, Ld] | position within the modality |
| dec_valid      | bool  | [B, Ld] | real target |
| dec_causal     | bool  | [B, Ld] | True at sequence-target positions (causal within their modality) |

Decoder tokens of one modality are contiguous and, for sequence targets, in order; one example holds at most
one segment per modality, so the modality id is the decoder's segment id.
"""

from __future__ import annotations

import numpy as np

BATCH_SPEC = {
    "enc_tokens": (np.int32, "enc"),
    "enc_modality": (np.int32, "enc"),
    "enc_pos": (np.int32, "enc"),
    "enc_valid": (np.bool_, "enc"),
    "dec_input": (np.int32, "dec"),
    "dec_target": (np.int32, "dec"),
    "dec_modality": (np.int32, "dec"),
    "dec_pos": (np.int32, "dec"),
    "dec_valid": (np.bool_, "dec"),
    "dec_causal": (np.bool_, "dec"),
}


def check_batch(batch: dict, batch_size: int, enc_len: int, dec_len: int) -> None:
    """Raise ValueError unless ``batch`` has exactly the keys, dtypes and shapes of the contract."""
    if set(batch) != set(BATCH_SPEC):
        raise ValueError(f"batch keys {sorted(batch)} != {sorted(BATCH_SPEC)}")
    for key, (dtype, side) in BATCH_SPEC.items():
        shape = (batch_size, enc_len if side == "enc" else dec_len)
        arr = batch[key]
        if tuple(arr.shape) != shape or np.dtype(arr.dtype) != np.dtype(dtype):
            raise ValueError(f"batch[{key!r}]: {arr.dtype}{tuple(arr.shape)}, want {np.dtype(dtype)}{shape}")
