"""Pre-training: settings checks, augmentation, and short real runs that must learn."""
import pytest
import torch

from atop.config import Config, ConfigError
from atop.data import load_split, subset
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.presets import PretrainSettings, get_preset
from atop.pretrain import _augment, accuracy, train_classifier, train_purifier


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


def _stopped_after_first_epoch(run, partial):
    """Run a training generator until its first epoch is saved, then drop it (as a killed task)."""
    next(run)
    run.close()
    assert partial.path.is_file()


def test_a_killed_pretraining_resumes_after_its_last_epoch_as_if_never_stopped(cifar_dir, tmp_path):
    """Both stages, 2 epochs each: stopped after epoch 1 and resumed from `<entry>.partial`, they end
    with exactly the weights of an uninterrupted run (same data order, RT draws, optimizer state)."""
    from atop.pretrain import EpochCheckpoint

    train = subset(load_split("cifar10", "train", cifar_dir), 96, seed=0)
    settings = PretrainSettings(classifier_epochs=2, purifier_epochs=2, batch_size=32, crop_pad=2,
                                purifier_ce_weight=0.1, purifier_rts="rt1,rt2")
    cfg = Config.from_dict({"classifier": "small_cnn", "purifier_width": 8})

    def classifier_run(resume=None, save=None):
        torch.manual_seed(0)
        model = CLASSIFIERS["small_cnn"](10)
        return model, train_classifier(model, train, settings, resume=resume, save=save)

    whole, run = classifier_run()
    list(run)
    partial = EpochCheckpoint(tmp_path / "classifier.pt")
    _, run = classifier_run(save=partial.save)
    _stopped_after_first_epoch(run, partial)
    resumed, run = classifier_run(resume=partial.load(), save=partial.save)
    assert [r["epoch"] for r in run] == [2]  # only the epoch left
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True))

    def purifier_run(resume=None, save=None):
        torch.manual_seed(0)
        purifier, disc = PURIFIERS["unet"](8), PatchDiscriminator(8)
        return purifier, train_purifier(cfg, purifier, disc, whole, train, settings, resume=resume, save=save)

    whole_pur, run = purifier_run()
    list(run)
    partial = EpochCheckpoint(tmp_path / "purifier.pt")
    _, run = purifier_run(save=partial.save)
    _stopped_after_first_epoch(run, partial)
    resumed_pur, run = purifier_run(resume=partial.load())
    assert [r["epoch"] for r in run] == [2]
    assert all(torch.equal(a, b) for a, b in zip(whole_pur.state_dict().values(), resumed_pur.state_dict().values(),
                                                 strict=True))


def test_ensure_pretrained_goes_on_from_a_partial_stage_and_removes_it(cifar_dir, tmp_path):
    from atop.pretrain import EpochCheckpoint, ensure_pretrained
    from atop.pretrained_cache import cache_paths

    train = subset(load_split("cifar10", "train", cifar_dir), 96, seed=0)
    settings = PretrainSettings(classifier_epochs=2, purifier_epochs=1, batch_size=32, purifier_rts="rt2")
    cfg = Config.from_dict({"classifier": "small_cnn", "purifier_width": 8})
    clf_path, _ = cache_paths(cfg, settings, train, tmp_path)
    partial = EpochCheckpoint(clf_path)
    torch.manual_seed(cfg.seed)
    _stopped_after_first_epoch(train_classifier(CLASSIFIERS["small_cnn"](10), train, settings, seed=cfg.seed,
                                                save=partial.save), partial)
    (tmp_path / "torn.pt.partial").write_bytes(b"PK\x03\x04 torn")  # an unreadable partial is no resume point
    assert EpochCheckpoint(tmp_path / "torn.pt").load() is None
    lines: list[str] = []
    clf, pur = ensure_pretrained(cfg, settings, tmp_path, train=train, log=lines.append)
    assert clf == clf_path and clf.is_file() and pur.is_file()
    assert any(line.startswith("pretrain classifier: resuming after epoch 1/2") for line in lines), lines
    assert any(line.startswith("pretrain purifier: 1 epoch(s)") for line in lines), lines
    assert not partial.path.exists() and not list(tmp_path.glob(f"{pur.name}.partial"))
