"""`--set KEY=VALUE` (medscale/configs/__init__.py): what each kind of field accepts and how it is converted, the
same rules for FieldReference fields (model.d_model, train.steps) as for plain ones, and every mistake as one
line `error: --set KEY: ...` with exit status 2."""

import pytest

from medscale.cli import main
from medscale.configs import load_config
from medscale.errors import UserError


def _get(cfg, key):
    for p in key.split("."):
        cfg = cfg[p]
    return cfg


@pytest.mark.parametrize("item, key, value", [
    ("train.lr=1e-3", "train.lr", 1e-3),
    ("train.lr=1", "train.lr", 1.0),  # an int for a float field becomes a float
    ("train.lr=None", "train.lr", None),
    ("train.tokens=50_000_000", "train.tokens", 50_000_000),
    (" train.steps = 5", "train.steps", 5),  # a FieldReference(None, field_type=int)
    ("train.steps=None", "train.steps", None),
    ("model.d_model=64", "model.d_model", 64),
    ("model.mlp=swiglu", "model.mlp", "swiglu"),
    ("model.mlp=3", "model.mlp", "3"),  # a text field takes the value as written, FieldReference or not
    ("data.data_dir=123", "data.data_dir", "123"),
    ("data.data_dir=/tmp/a b", "data.data_dir", "/tmp/a b"),
    ("model.size='xs'", "model.size", "xs"),  # a quoted literal is its text
    ("data.mixture=all2all:1.0", "data.mixture", "all2all:1.0"),
    ("data.modalities=['image', 'caption']", "data.modalities", ("image", "caption")),  # a list for a tuple
    ("mesh.shape=(2,1,1)", "mesh.shape", (2, 1, 1)),
    ("hardware=None", "hardware", None),
])
def test_accepted_values(item, key, value):
    got = _get(load_config("tiny", [item]), key)
    assert got == value and type(got) is type(value), got


@pytest.mark.parametrize("item, message", [
    ("train.lr", "--set 'train.lr': write dotted.key=value"),
    ("train.no_such_key=1", "--set train.no_such_key: unknown config key 'no_such_key'"),
    ("nosuch.lr=1", "--set nosuch.lr: unknown config key 'nosuch'"),
    ("train.lr.x=1", "--set train.lr.x: train.lr is a float, not a group of keys"),
    ("mesh.shape.0=2", "--set mesh.shape.0: mesh.shape is a tuple, not a group of keys"),
    ("train.lr=abc", "--set train.lr: expected float, got 'abc'"),
    ("train.tokens=5e7", "--set train.tokens: expected int, got '5e7'"),
    ("seed=True", "--set seed: expected int, got 'True'"),
    ("model.d_model=abc", "--set model.d_model: expected int, got 'abc'"),  # FieldReference: same message
    ("model.d_model=True", "--set model.d_model: expected int, got 'True'"),
    ("train.steps=5.0", "--set train.steps: expected int, got '5.0'"),
    ("data.modalities=image", "--set data.modalities: expected tuple, got 'image'"),
    ("model=1", "--set model: expected ConfigDict, got '1'"),
])
def test_mistakes_are_one_line_errors(item, message, capsys):
    with pytest.raises(UserError) as exc:
        load_config("tiny", [item])
    assert str(exc.value) == message
    code = main(["flops", "--config", "tiny", "--set", item])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: {message}\n"
