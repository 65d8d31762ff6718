"""The typed config: unknown keys, type conversion, ranges, config files."""
import json

import pytest

from atop.config import Config, ConfigError, GradPath, Norm, RTType


def test_defaults_validate_and_round_trip_through_strings():
    cfg = Config.from_dict({})
    as_strings = {k: str(v) for k, v in cfg.to_dict().items()}  # what MLflow params hold
    assert Config.from_dict(as_strings) == cfg


def test_strings_become_enums_and_numbers():
    cfg = Config.from_dict({"rt": "RT3", "train_norm": "l2", "train_grad_path": "defense", "train_eps": "0.5",
                            "epochs": "3", "train_random_start": "true"})
    assert cfg.rt is RTType.RT3 and cfg.train_norm is Norm.L2 and cfg.train_grad_path is GradPath.DEFENSE
    assert cfg.train_eps == 0.5 and cfg.epochs == 3 and cfg.train_random_start is True


@pytest.mark.parametrize("values, fragment", [
    ({"rt": "rt9"}, "rt='rt9' is unknown; accepted: rt1, rt2, rt3"),
    ({"train_eps": -0.1}, "train_eps=-0.1 is out of range"),
    ({"lambda": 0.1}, "unknown config key(s) 'lambda'"),
    ({"epochs": 1.5}, "epochs=1.5 is not an integer"),
    ({"lr": "fast"}, "lr='fast' is not a number"),
    ({"lr": float("nan")}, "is not a number"),
    ({"classifier": "vgg"}, "classifier='vgg' is unknown; accepted: small_cnn"),
    ({"unseen_attacks": "pgd_l2,nope"}, "unseen_attacks entry='nope' is unknown"),
    ({"train_random_start": "maybe"}, "is not a boolean"),
])
def test_bad_values_give_one_line_errors(values, fragment):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(values)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_step_size_default_rules():
    assert Config.from_dict({"train_attack": "fgsm", "train_eps": 0.03}).step_size == 0.03
    assert Config.from_dict({"train_attack": "pgd", "train_eps": 0.03, "train_steps": 10}).step_size == pytest.approx(0.0075)


def test_config_files_yaml_and_json(tmp_path):
    (tmp_path / "a.yaml").write_text("rt: rt1\nlambda_ce: 0.05\n")
    (tmp_path / "b.json").write_text(json.dumps({"rt": "rt3"}))
    assert Config.from_file(tmp_path / "a.yaml").lambda_ce == 0.05
    assert Config.from_file(tmp_path / "b.json", epochs=4).epochs == 4
    (tmp_path / "c.yaml").write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="does not parse"):  # safe_load refuses code tags
        Config.from_file(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("bogus_key: 1\n")
    with pytest.raises(ConfigError, match="unknown config key"):
        Config.from_file(tmp_path / "d.yaml")
