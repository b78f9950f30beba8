"""A finished (or checkpointed) run, ready to decode: config, spec, parameters, tokenizers, held-out data.

``load_run(workdir, checkpoint=None)`` reads ``config.json``, rebuilds the ModelSpec, restores the parameters of
the orbax checkpoint (the latest, or step ``checkpoint``) written by ``medscale.train.loop`` into
``workdir/checkpoints``, and opens the run's data (``medscale.data.pipeline.build_data``) for its tokenizers and
its held-out split. Every missing piece is a :class:`UserError` naming what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from medscale import rundir
from medscale.configs import spec_from_config
from medscale.data.pipeline import build_data
from medscale.errors import UserError
from medscale.generate.decode import Decoder
from medscale.model.sharding import make_mesh
from medscale.train.loop import opt_config, run_length
from medscale.train.step import abstract_model, build

HELDOUT_SPLIT = "validation"


@dataclasses.dataclass
class LoadedRun:
    workdir: str
    cfg: Any
    spec: Any
    model: Any
    decoder: Any
    data: Any
    tokenizers: dict
    image_size: int
    step: int
    split: str = HELDOUT_SPLIT


def read_config(workdir: str):
    path = rundir.path(workdir, rundir.CONFIG)
    if not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir}: no such directory")
    if not os.path.exists(path):
        raise UserError(f"{workdir} is not a run directory (no config.json); give the --workdir of a "
                        "`medscale train` run")
    try:
        with open(path) as f:
            cfg = ml_collections.ConfigDict(json.load(f))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is unreadable: {exc}") from None
    for section in ("model", "data", "train"):
        if section not in cfg:
            raise UserError(f"{path} has no {section!r} section; is it a medscale run?")
    return cfg


def _abstract_train_state(cfg, spec):
    """The training loop's abstract state on one device (a target for checkpoints saved under a mesh)."""
    prog = build(spec, opt_config(cfg, run_length(cfg)), mesh=make_mesh((1, 1, 1), jax.devices()[:1]),
                 dtype=cfg.model.dtype, remat="none", attention=cfg.model.attention, donate=False)
    return prog.abstract_state


def restore_params(workdir: str, cfg, spec, step: int | None):
    """(params pure dict, step) of a checkpoint of the training loop (:func:`medscale.rundir.restore_params`,
    with the training loop's abstract state on one device as the fallback target)."""
    return rundir.restore_params(workdir, step, lambda: _abstract_train_state(cfg, spec))


INFERENCE_ATTENTION = {"cudnn": "dense", "xla": "dense", "blockwise": "dense"}  # exact full attention on any device


def build_model(spec, cfg, params):
    attention = INFERENCE_ATTENTION.get(cfg.model.attention, cfg.model.attention)
    abstract = abstract_model(spec, cfg.model.dtype, "none", attention)
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load_run(workdir: str, checkpoint: int | None = None, data=None) -> LoadedRun:
    cfg = read_config(workdir)
    spec = spec_from_config(cfg)
    params, step = restore_params(workdir, cfg, spec, checkpoint)
    model = build_model(spec, cfg, params)
    if data is None:
        data = build_data(cfg, spec)
    return LoadedRun(workdir=workdir, cfg=cfg, spec=spec, model=model, decoder=Decoder(model), data=data,
                     tokenizers=tokenizer_dict(data.tokenizers), image_size=int(cfg.data.image_size), step=step)


def tokenizer_dict(tokenizers) -> dict:
    """The data package's ``Tokenizers`` (or a dict) as ``{tokenizer name: tokenizer}``, absent ones left out."""
    return {k: v for k, v in tokenizers.items() if v is not None}


def heldout_examples(run: LoadedRun, num: int, split: str = HELDOUT_SPLIT) -> list[dict]:
    """The first ``num`` raw examples of ``split``: dicts with ``image``, ``caption``, ``boxes``, ``mask``
    and (synthetic data) ``facts``."""
    return [example(run, split, i) for i in range(min(num, num_examples(run, split)))]


def num_examples(run: LoadedRun, split: str) -> int:
    return len(run.data.examples(split))


def example(run: LoadedRun, split: str, index: int) -> dict:
    """Raw example ``index`` of ``split`` (``medscale.data.pipeline.Examples``)."""
    n = num_examples(run, split)
    if not 0 <= index < n:
        raise UserError(f"--example {split}:{index}: index out of range (the split has {n} examples)")
    return dict(run.data.examples(split)[index])
