from medscale.cli import main


def test_unknown_command_is_one_line_error(capsys):
    assert main(["no-such-command"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")


def test_unknown_override_key_is_user_error():
    import pytest

    from medscale.configs import load_config
    from medscale.errors import UserError

    with pytest.raises(UserError, match="unknown config key"):
        load_config("tiny", ["train.no_such_key=1"])
    cfg = load_config("tiny", ["train.lr=0.01", "model.size=xs"])
    assert cfg.train.lr == 0.01 and cfg.model.size == "xs"


def test_spec_from_config_bad_heads():
    import pytest

    from medscale.configs import load_config, spec_from_config
    from medscale.errors import UserError

    with pytest.raises(UserError, match="not divisible by heads"):
        spec_from_config(load_config("tiny", ["model.num_heads=3"]))
