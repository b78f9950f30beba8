"""Generation and downstream evaluation: decoding any input subset to any target subset of a trained run,
detokenising to a caption, boxes and a mask, and task metrics on held-out data.

- ``metrics``: caption BLEU-4 and finding accuracy, box matched IoU and AP@0.5, segmentation mIoU (numpy).
"""
