"""Benchmarks (``medscale bench``): the training step's speed and MFU (``step``), against PyTorch (``versus_torch``
with the peer script ``torch_encdec.py``, which imports torch and runs in its own interpreter), memory and time
against sequence length (``seqlen``), the input pipeline (``data``) and the law fit (``fit``)."""
