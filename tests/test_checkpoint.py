"""Checkpoint round trip, classifier references, and clear errors for bad files."""
import os

import pytest
import torch

from atop.checkpoint import (
    STUDY_CACHE_DIR,
    build_classifier,
    classifier_reference,
    load_checkpoint,
    load_defense,
    save_checkpoint,
)
from atop.checkpoint_file import CheckpointError, sha256
from atop.config import Config
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator


@pytest.fixture
def saved(tmp_path):
    cfg = Config.from_dict({"purifier_width": 8, "rt": "rt3"})
    torch.manual_seed(0)
    clf, pur = CLASSIFIERS["small_cnn"](10).eval(), PURIFIERS["unet"](8)
    path = save_checkpoint(tmp_path / "d.pt", kind="defense", cfg=cfg, classifier=clf, purifier=pur,
                           discriminator=PatchDiscriminator(), epoch=2, metrics={"clean_acc": 0.5})
    return cfg, clf, pur, path


def test_round_trip_restores_the_same_defense(saved):
    cfg, clf, pur, path = saved
    defense = load_defense(path, seed=1)
    assert not defense.training and defense.transform.rt.value == "rt3"
    x = torch.rand(2, 3, 32, 32)
    blob = load_checkpoint(path)
    assert blob["config"] == cfg and blob["epoch"] == 2 and blob["metrics"]["clean_acc"] == 0.5
    defense.reseed(1)
    views, holes = defense.transform(x, defense.generator(x.device))
    expected = clf(defense.transform.combine(pur(views, holes), holes))
    defense.reseed(1)
    assert torch.allclose(defense(x), expected, atol=1e-6)


def test_classifier_by_reference_is_checked(tmp_path):
    cfg = Config.from_dict({})
    clf_path = save_checkpoint(tmp_path / "clf.pt", kind="classifier", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10))
    path = save_checkpoint(tmp_path / "d.pt", kind="defense", cfg=cfg, classifier_ref=clf_path,
                           purifier=PURIFIERS["unet"](16))
    assert isinstance(build_classifier(load_checkpoint(path)), torch.nn.Module)
    save_checkpoint(clf_path, kind="classifier", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10))
    with pytest.raises(CheckpointError, match="now has another sha256"):
        build_classifier(load_checkpoint(path))


@pytest.fixture
def study(tmp_path, monkeypatch):
    """A study's layout: the classifier once in `<storage>/.pretrained-cache/`, a trial's defense
    checkpoint naming it by the sha256 of the bytes the study shared, deep below the storage path."""
    monkeypatch.setenv("ATOP_CACHE_DIR", str(tmp_path / "user-cache"))  # not the session's shared cache
    cfg = Config.from_dict({"purifier_width": 8})
    torch.manual_seed(0)
    clf, pur = CLASSIFIERS["small_cnn"](10).eval(), PURIFIERS["unet"](8)
    clf_path = save_checkpoint(tmp_path / "storage" / STUDY_CACHE_DIR / "classifier-small_cnn-k.pt", kind="classifier",
                               cfg=cfg, classifier=clf)
    ref = classifier_reference(clf_path.read_bytes())
    path = save_checkpoint(tmp_path / "storage" / "study" / "trial_0" / "artifacts" / "defense.pt", kind="defense",
                           cfg=cfg, classifier_ref=ref, purifier=pur, discriminator=PatchDiscriminator())
    return clf, clf_path, ref, path


def test_a_trial_checkpoint_names_its_classifier_and_finds_it_in_the_study_cache(study):
    clf, clf_path, ref, path = study
    blob = torch.load(path, weights_only=True)
    assert "classifier" not in blob and blob["classifier_ref"] == ref
    assert ref == {"sha256": sha256(clf_path), "name": "small_cnn", "num_classes": 10, "size": clf_path.stat().st_size}
    assert path.stat().st_size < clf_path.stat().st_size  # the purifier alone; the classifier is not copied
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_defense(path).classifier(x), clf(x))
        for given in (clf_path, str(clf_path), clf_path.read_bytes(), clf_path.parent):  # file, bytes, folder
            assert torch.equal(load_defense(path, classifier=given).classifier(x), clf(x))


def test_a_classifier_moved_to_the_user_cache_or_beside_the_file_is_found(study, tmp_path):
    clf, clf_path, _, path = study
    for place in (tmp_path / "user-cache", path.parent):
        place.mkdir(exist_ok=True)
        clf_path = clf_path.rename(place / "renamed.pt")  # found by sha256, whatever its name
        assert isinstance(load_defense(path).classifier, type(clf))


def test_a_missing_classifier_is_one_line_naming_the_sha256_and_where_it_looked(study, tmp_path):
    _, clf_path, ref, path = study
    clf_path.unlink()
    with pytest.raises(CheckpointError) as info:
        load_defense(path)
    msg = str(info.value)
    assert "\n" not in msg and ref["sha256"] in msg and "small_cnn" in msg, msg
    assert str(path.parent) in msg and str(tmp_path / "user-cache") in msg and STUDY_CACHE_DIR in msg, msg
    assert "--classifier" in msg, msg
    with pytest.raises(CheckpointError, match="does not exist") as info:
        load_defense(path, classifier=clf_path)
    assert ref["sha256"] in str(info.value)
    with pytest.raises(CheckpointError, match="not found") as info:
        load_defense(path, classifier=tmp_path)  # a folder without it
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_another_classifier_is_refused_naming_both_sha256(study, tmp_path):
    _, clf_path, ref, path = study
    other = save_checkpoint(tmp_path / "other.pt", kind="classifier", cfg=Config.from_dict({"purifier_width": 8}),
                            classifier=CLASSIFIERS["small_cnn"](10))
    for given in (other, other.read_bytes()):
        with pytest.raises(CheckpointError, match="has sha256") as info:
            load_defense(path, classifier=given)
        msg = str(info.value)
        assert sha256(other) in msg and ref["sha256"] in msg and "\n" not in msg, msg
    # a file of the same size but other weights, where the search looks, is hashed and passed over
    assert other.stat().st_size == clf_path.stat().st_size
    os.replace(other, clf_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_defense(path)


def test_an_old_self_contained_or_path_referencing_checkpoint_still_loads(tmp_path):
    cfg = Config.from_dict({"purifier_width": 8})
    clf, pur = CLASSIFIERS["small_cnn"](10).eval(), PURIFIERS["unet"](8)
    clf_path = save_checkpoint(tmp_path / "models" / "clf.pt", kind="classifier", cfg=cfg, classifier=clf)
    old = {"format": "atop-checkpoint", "version": 1, "kind": "defense", "config": cfg.to_dict(), "epoch": 1,
           "metrics": {}, "purifier": {"name": "unet", "width": 8, "state_dict": pur.state_dict()}}
    torch.save({**old, "classifier": {"name": "small_cnn", "num_classes": 10, "state_dict": clf.state_dict()}},
               tmp_path / "embedded.pt")
    (tmp_path / "runs").mkdir()
    torch.save({**old, "classifier_ref": {"path": "../models/clf.pt", "sha256": sha256(clf_path)}},
               tmp_path / "runs" / "by_path.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        for name in ("embedded.pt", "runs/by_path.pt"):
            assert torch.equal(load_defense(tmp_path / name).classifier(x), clf(x)), name


def test_truncated_file_is_a_clear_error(saved, tmp_path):
    *_, path = saved
    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt") as info:
        load_checkpoint(bad)
    assert "\n" not in str(info.value)


def test_wrong_kind_wrong_model_and_foreign_files(saved, tmp_path):
    cfg, *_ = saved
    clf_only = save_checkpoint(tmp_path / "c.pt", kind="classifier", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10))
    with pytest.raises(CheckpointError, match="expected 'defense'"):
        load_defense(clf_only)
    torch.save({"format": "atop-checkpoint", "version": 1, "kind": "defense", "config": cfg.to_dict(),
                "classifier": {"name": "resnet18", "num_classes": 10, "state_dict": CLASSIFIERS["small_cnn"](10).state_dict()},
                "purifier": {"name": "unet", "width": 8, "state_dict": PURIFIERS["unet"](8).state_dict()}}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="do not fit the ResNet18"):
        load_defense(tmp_path / "m.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not an atop checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_atomic_write_leaves_no_temporary_files(saved):
    *_, path = saved
    assert [p.name for p in path.parent.iterdir()] == ["d.pt"]


def test_foreign_files_are_refused_without_advising_an_unsafe_load(tmp_path):
    import datetime
    import pickle

    files = {"folder.pt": None, "empty.pt": b"", "text.pt": b"hello world\n",
             "plain.pkl": pickle.dumps({"format": "atop-checkpoint"})}
    (tmp_path / "folder.pt").mkdir()
    for name, data in files.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    torch.save({"when": datetime.date(2024, 1, 1)}, tmp_path / "objects.pt")  # a global the safe load refuses
    reasons = {"folder.pt": "is a folder", "empty.pt": "empty file", "text.pt": "corrupt",
               "plain.pkl": "corrupt", "objects.pt": "Python objects"}
    for name, reason in reasons.items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        msg = str(info.value)
        assert name in msg and reason in msg and "atop checkpoint file" in msg and "\n" not in msg, msg
        assert "weights_only" not in msg and "trust" not in msg, msg


@pytest.mark.parametrize("change, needle", [
    (lambda b: b["classifier"].update(name="vgg"), "name in"),
    (lambda b: b["classifier"].update(num_classes=10**9), "for 10 classes"),
    (lambda b: b["classifier"].update(state_dict={"w": "not a tensor"}), "dict of named tensors"),
    (lambda b: b["purifier"].update(width=4096), "of width 8"),
    (lambda b: b.update(discriminator=[1, 2]), "discriminator state_dict"),
    (lambda b: b.update(classifier_ref={"path": 3}, classifier=None) or b.pop("classifier"), "classifier_ref"),
    (lambda b: b.update(kind="everything"), "kind='everything'"),
    (lambda b: b.update(config="rt=rt1"), "no config dict"),
])
def test_a_checkpoint_of_the_wrong_layout_is_refused_before_building_models(saved, tmp_path, change, needle):
    *_, path = saved
    blob = torch.load(path, weights_only=True)
    change(blob)
    torch.save(blob, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=needle):
        load_defense(tmp_path / "odd.pt")


def test_evaluate_cli_takes_the_classifier_by_option_and_says_which_it_lacks(study, tmp_path, tmp_path_factory,
                                                                               capsys, cifar_dir):
    from atop.evaluate import main

    _, clf_path, ref, path = study
    moved = clf_path.rename(tmp_path_factory.mktemp("away") / "elsewhere.pt")  # not in any folder searched
    args = ["--checkpoint", str(path), "--level", "screen", "--n-images", "2", "--steps", "1", "--eot", "1",
            "--no-audit", "--data-dir", str(cifar_dir)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and ref["sha256"] in err and "--classifier" in err, err
    assert main([*args, "--out", str(tmp_path / "b"), "--classifier", str(moved)]) == 0
    assert (tmp_path / "b" / "eval.json").is_file()
