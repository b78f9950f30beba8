"""medscale: compute-optimal scaling studies of a unified multimodal medical encoder-decoder."""

__version__ = "0.1.0"
