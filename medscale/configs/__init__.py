"""Configs: ml_collections Python files returning a ``ConfigDict``, plus loading and overrides.

``load_config("path/to/file.py:arg1,arg2", ["train.lr=1e-3", ...])`` calls the file's ``get_config(arg)``
and applies dotted overrides; every mistake is a :class:`medscale.errors.UserError`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import os

from medscale import modalities
from medscale.configs.ladder import ladder_shape
from medscale.errors import UserError
from medscale.spec import ModelSpec

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
    """Apply ``a.b.c=value`` overrides in place; an unknown key is a UserError.

    ``value`` is a Python literal, or else text; it must fit the field's declared type (``ConfigDict.get_type``,
    a ``FieldReference``'s type included): an int becomes a float for a float field, a list a tuple, and a
    text field takes ``value`` as written. Why not ``ml_collections.config_flags``: docs/interfaces.md."""
    for item in overrides or ():
        if "=" not in item:
            raise UserError(f"--set {item!r}: write dotted.key=value")
        key, _, raw = item.partition("=")
        parts = key.strip().split(".")
        node = cfg
        for i, p in enumerate(parts):
            if not callable(getattr(node, "get_type", None)):  # a ConfigDict (duck-typed: `budget` never loads ml_collections)
                raise UserError(f"--set {key}: {'.'.join(parts[:i]) or 'the config'} is a {type(node).__name__}, "
                                "not a group of keys")
            if p not in node:
                raise UserError(f"--set {key}: unknown config key {p!r}")
            if i < len(parts) - 1:
                node = node[p]
        leaf = parts[-1]
        expected = node.get_type(leaf)
        value = _parse_value(raw)
        if value is not None and expected is not type(None) and type(value) is not expected:
            if expected is float and type(value) is int:
                value = float(value)
            elif expected is tuple and isinstance(value, list):
                value = tuple(value)
            elif expected is str:
                value = str(raw)
            else:
                raise UserError(f"--set {key}: expected {expected.__name__}, got {raw!r}")
        try:
            node[leaf] = value
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"--set {key}: {exc}") from None


def spec_from_config(cfg):
    """Build the :class:`medscale.spec.ModelSpec` a config describes (its modalities: ``cfg.data.modalities``,
    in registry order, sized by the registry's ``cfg.data`` keys)."""
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
    wanted = list(d.modalities)
    unknown = [w for w in wanted if w not in modalities.names()]
    if unknown:
        raise UserError(f"unknown modality {unknown[0]!r} in data.modalities; known: "
                        + ", ".join(modalities.names()))
    mods = modalities.specs(d, grid, wanted)
    return ModelSpec(modalities=mods, enc_len=d.enc_len, dec_len=d.dec_len,
                     name=m.get("size") or "custom", encoder=m.get("encoder") or "unified",
                     enc_split=tuple(d.get("enc_split") or ()), **shape)
