"""Pre-training: settings checks, augmentation, and short real runs that must learn."""
import pytest
import torch

from atop.config import Config, ConfigError
from atop.data import load_split, subset
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.presets import get_preset
from atop.pretrain import PretrainSettings, _augment, accuracy, train_classifier, train_purifier


@pytest.mark.parametrize("bad", [{"label_smoothing": 1.0}, {"crop_pad": -1}, {"purifier_rts": "rt2,rt9"},
                                 {"purifier_rts": ""}, {"classifier_batch_size": -2}, {"purifier_ce_weight": -1.0}])
def test_bad_settings_are_one_line_errors(bad):
    with pytest.raises(ConfigError) as info:
        PretrainSettings(**bad)
    name = next(iter(bad))
    assert name in str(info.value) and "accepted" in str(info.value) and "\n" not in str(info.value)


def test_augment_translates_and_flips_whole_images():
    x = torch.rand(16, 3, 8, 8)
    out = _augment(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(16):  # each output is one crop of its padded image, possibly mirrored
        crops = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)
    assert not torch.equal(out, x)


def test_cifar10_cpu_preset_builds():
    preset = get_preset("cifar10-cpu")
    cfg = Config.from_dict(preset.config)
    assert cfg.classifier == "fast_cnn" and preset.pretrain.n_train == 0 and preset.pretrain.bf16


def test_classifier_learns_on_real_images(cifar_dir):
    torch.manual_seed(0)
    train = subset(load_split("cifar10", "train", cifar_dir), 256, seed=0)
    settings = PretrainSettings(classifier_epochs=3, classifier_lr=0.1, batch_size=32, label_smoothing=0.1,
                                crop_pad=2, bf16=True, channels_last=True)
    model = CLASSIFIERS["fast_cnn"](10)
    reports = list(train_classifier(model, train, settings, test=subset(train, 128)))
    assert reports[-1]["loss"] < reports[0]["loss"] - 0.1
    assert reports[-1]["train_acc"] > reports[0]["train_acc"]
    # eval-mode accuracy after a few dozen steps says little (BN statistics still settling): only
    # check that the per-epoch figure is the one `accuracy` gives and that training mode is restored
    assert accuracy(model, subset(train, 128), settings) == reports[-1]["test_acc"] and model.training


def test_purifier_learns_on_real_images(cifar_dir):
    torch.manual_seed(0)
    train = subset(load_split("cifar10", "train", cifar_dir), 128, seed=0)
    settings = PretrainSettings(purifier_epochs=3, batch_size=32, purifier_ce_weight=0.1, purifier_rts="rt2",
                                channels_last=True)
    cfg = Config.from_dict({"classifier": "small_cnn", "purifier_width": 8})
    purifier = PURIFIERS["unet"](8)
    reports = list(train_purifier(cfg, purifier, PatchDiscriminator(8), CLASSIFIERS["small_cnn"](10), train, settings))
    assert reports[-1]["loss_l1"] < reports[0]["loss_l1"]
    assert reports[0]["loss_ce"] > 0  # the CE term of the frozen classifier is on


@pytest.mark.parametrize("args, needles", [
    (["classifier", "--out", "{tmp}"], ["--out", "is a folder"]),
    (["classifier", "--epochs", "0"], ["classifier_epochs=0", "accepted"]),
    (["purifier", "--dataset", "mnist"], ["'mnist'", "accepted"]),
    (["classifier", "--data-dir", "{tmp}/junk"], ["cifar10_train.npz"]),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needles):
    from atop.pretrain import main

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "cifar10_train.npz").write_text("not an npz")
    out = str(tmp_path / "out.pt")
    argv = ["--out", out] + [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle.replace("{tmp}", str(tmp_path)) in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk"]
