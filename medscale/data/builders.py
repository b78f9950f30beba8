"""TFDS builders (ArrayRecord, read with ``tfds.data_source``; no TensorFlow needed).

Every builder yields the same feature set, so that the pipeline reads any of them alike:

- ``image``: grey-scale PNG ``[S, S, 1]`` (real images are converted to grey and resized to ``S`` x ``S``);
- ``mask``: per-pixel class PNG ``[S, S, 1]`` (:data:`medscale.data.synthetic.MASK_CLASSES`), ``has_mask`` False
  (and an all-zero mask) where the dataset has none;
- ``caption``: text ("" when absent);
- ``boxes``: float32 ``[n, 4]`` pixels ``x0, y0, x1, y1`` and ``box_labels``: the n class names joined by ``|``;
- ``facts``: JSON of the true structured findings (synthetic data only; ``{}`` elsewhere, so that "finding
  accuracy" is computed on synthetic data only);
- ``meta``: JSON of other source information (ROCO subset, ROCOv2 CUIs, MedMNIST label; ``{}`` if none);
- ``question``, ``answer``: visual question answering text ("" when absent) and ``answer_type``: ``closed``
  (yes/no and choice questions) or ``open`` (VQA-RAD's and SLAKE's CLOSED / OPEN, lower case);
- ``id``: the example's name in its source, ``index``: its number in the generation order.

Images are encoded by PIL (TFDS's own numpy image encoder needs TensorFlow).
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import tensorflow_datasets as tfds

from medscale.data.synthetic import HELDOUT_BASE, render_scene

log = logging.getLogger(__name__)

VERSION = tfds.core.Version("3.0.0")  # 2.0.0: held-out splits only, from index HELDOUT_BASE; 3.0.0: question,
# answer and answer_type


def png_bytes(a: np.ndarray) -> bytes:
    import PIL.Image

    buf = io.BytesIO()
    PIL.Image.fromarray(np.asarray(a, np.uint8)).save(buf, format="png", compress_level=1)
    return buf.getvalue()


def features(size: int):
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
        "mask": tfds.features.Image(shape=(size, size, 1), encoding_format="png"),
        "has_mask": np.bool_,
        "caption": tfds.features.Text(),
        "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
        "box_labels": tfds.features.Text(),
        "facts": tfds.features.Text(),
        "meta": tfds.features.Text(),
        "question": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "answer_type": tfds.features.Text(),
        "id": tfds.features.Text(),
        "index": np.int64,
    })


def make_example(index: int, image: np.ndarray, caption: str = "", mask: np.ndarray | None = None,
                 boxes=(), facts: dict | None = None, ident: str = "", meta: dict | None = None,
                 question: str = "", answer: str = "", answer_type: str = "") -> dict:
    size = image.shape[0]
    return {
        "image": png_bytes(image),
        "mask": png_bytes(mask if mask is not None else np.zeros((size, size), np.uint8)),
        "has_mask": mask is not None,
        "caption": caption,
        "boxes": np.asarray([b[1:] for b in boxes], np.float32).reshape(-1, 4),
        "box_labels": "|".join(str(b[0]) for b in boxes),
        "facts": json.dumps(facts or {}, sort_keys=True),
        "meta": json.dumps(meta or {}, sort_keys=True),
        "question": question,
        "answer": answer,
        "answer_type": answer_type,
        "id": ident or str(index),
        "index": int(index),
    }


class SyntheticMedConfig(tfds.core.BuilderConfig):
    def __init__(self, *, image_size: int = 64, num_eval: int = 512, seed: int = 0, **kw):
        name = kw.pop("name", None) or f"s{image_size}_e{num_eval}_seed{seed}"
        super().__init__(name=name, version=VERSION, **kw)
        self.image_size, self.num_eval, self.seed = image_size, num_eval, seed


class SyntheticMed(tfds.core.GeneratorBasedBuilder):
    """Procedural medical-like scenes (medscale.data.synthetic): the held-out splits validation and test. The
    training examples are the stream of scenes ``0, 1, 2, ...`` (``medscale.data.stream``), tokenised without
    going through TFDS; the held-out splits start at index ``HELDOUT_BASE``, beyond any training stream."""

    VERSION = VERSION
    code_path = None  # TFDS looks for checksum files next to the code via importlib_resources; none here
    BUILDER_CONFIGS = []  # noqa: RUF012 (the TFDS API) every config is made from cfg.data (pipeline.make_builder);
    # a listed one would clash with the custom config of the same name

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=features(self.builder_config.image_size))

    def _split_generators(self, dl_manager):
        c = self.builder_config
        # disjoint index ranges per split, all beyond the training stream
        return {"validation": self._generate_examples(HELDOUT_BASE, c.num_eval),
                "test": self._generate_examples(HELDOUT_BASE + c.num_eval, c.num_eval)}

    def _generate_examples(self, start: int, count: int):
        c = self.builder_config
        for index in range(start, start + count):
            s = render_scene(c.seed, index, c.image_size)
            yield index, make_example(index, s["image"], s["caption"], s["mask"], s["boxes"], s["facts"],
                                      f"synthetic-{index}", question=s["question"], answer=s["answer"],
                                      answer_type=s["answer_type"])
