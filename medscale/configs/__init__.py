"""Configs: ml_collections Python files returning a ``ConfigDict``, plus loading and overrides.

``load_config("path/to/file.py:arg1,arg2", ["train.lr=1e-3", ...])`` calls the file's ``get_config(arg)``
and applies dotted overrides; every mistake is a :class:`medscale.errors.UserError`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os

from medscale.configs.ladder import ladder_shape
from medscale.errors import UserError
from medscale.spec import ModelSpec, default_modalities

CONFIG_DIR = os.path.dirname(__file__)


def _resolve_path(path: str) -> str:
    if os.path.exists(path):
        return path
    candidate = os.path.join(CONFIG_DIR, path if path.endswith(".py") else path + ".py")
    if os.path.exists(candidate):
        return candidate
    raise UserError(f"config file {path!r} not found; give a path to a .py config or a name in {CONFIG_DIR}")


def call_get_config(path: str, arg: str = "", what: str = "config file", ignore_unused_arg: bool = False):
    """Execute the Python file ``path`` and return its ``get_config(arg)`` (``get_config()`` without ``arg``).

    Any failure in the user's file is a :class:`UserError` naming ``what`` and the file. With
    ``ignore_unused_arg``, a ``get_config`` that takes no argument is called without it."""
    name = "medscale_cfg_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    try:
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's file: any failure is theirs to fix
        raise UserError(f"{what} {path} does not load: {type(exc).__name__}: {exc}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{what} {path} defines no get_config()")
    try:
        try:
            return module.get_config(arg) if arg else module.get_config()
        except TypeError:
            if not (arg and ignore_unused_arg):
                raise
            return module.get_config()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - a user's file: any failure is theirs to fix
        raise UserError(f"{what} {path}: get_config() failed: {type(exc).__name__}: {exc}") from None


def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()):
    """Load ``FILE[:ARG]`` and apply ``dotted.key=value`` overrides."""
    path, _, arg = spec.partition(":")
    path = _resolve_path(path)
    cfg = call_get_config(path, arg, what="config file", ignore_unused_arg=True)
    apply_overrides(cfg, overrides)
    return cfg


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg, overrides) -> None:
    """Apply ``a.b.c=value`` overrides in place; an unknown key is a UserError."""
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"--set {item!r}: write dotted.key=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = cfg
        for p in parts[:-1]:
            if p not in node:
                raise UserError(f"--set {key}: unknown config key {p!r}")
            node = node[p]
        leaf = parts[-1]
        if leaf not in node:
            raise UserError(f"--set {key}: unknown config key {leaf!r}")
        value = _parse_value(raw)
        old = node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and type(old) is not type(value):
            if isinstance(old, tuple) and isinstance(value, list):
                value = tuple(value)
            elif isinstance(old, str):
                value = str(raw)
            else:
                raise UserError(f"--set {key}: expected {type(old).__name__}, got {raw!r}")
        try:
            node[leaf] = value
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"--set {key}: {exc}") from None


def spec_from_config(cfg):
    """Build the :class:`medscale.spec.ModelSpec` a config describes."""
    m, d = cfg.model, cfg.data
    shape = ladder_shape(m.size) if m.get("size") else {}
    for key in ("d_model", "enc_layers", "dec_layers", "num_heads", "d_ff", "mlp"):
        if m.get(key) is not None:
            shape[key] = m[key]
    missing = [k for k in ("d_model", "enc_layers", "dec_layers", "num_heads", "d_ff") if k not in shape]
    if missing:
        raise UserError(f"model config needs model.size or {', '.join('model.' + k for k in missing)}")
    grid = (d.image_size // d.patch_size,) * 2
    if d.image_size % d.patch_size:
        raise UserError(f"data.image_size {d.image_size} is not divisible by data.patch_size {d.patch_size}")
    mods = default_modalities(text_vocab=d.text_vocab, image_vocab=d.image_vocab, seg_vocab=d.seg_vocab,
                              grid=grid, caption_tokens=d.caption_tokens, box_tokens=d.box_tokens)
    wanted = list(d.modalities)
    unknown = [w for w in wanted if w not in {x.name for x in mods}]
    if unknown:
        raise UserError(f"unknown modality {unknown[0]!r} in data.modalities; known: "
                        + ", ".join(x.name for x in mods))
    mods = tuple(x for x in mods if x.name in wanted)
    return ModelSpec(modalities=mods, enc_len=d.enc_len, dec_len=d.dec_len,
                     name=m.get("size") or "custom", **shape)
