"""Checkpoint round trip, classifier references, and clear errors for bad files."""
import pytest
import torch

from atop.checkpoint import (
    CheckpointError,
    build_classifier,
    load_checkpoint,
    load_defense,
    save_checkpoint,
)
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
    with pytest.raises(CheckpointError, match="sha256 differs"):
        build_classifier(load_checkpoint(path))


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
