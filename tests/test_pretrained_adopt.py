"""`--pretrained DIR`: given classifier/purifier files checked against the study's config and cached."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from atop.checkpoint import build_classifier, build_purifier, load_checkpoint, save_checkpoint
from atop.config import Config
from atop.data import Split
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from atop.presets import PretrainSettings
from atop.pretrain import ensure_pretrained
from atop.pretrained_cache import cache_paths
from study.errors import StudyError
from study.pretrained import (
    adopt_pretrained,
    check_classifier_checkpoint,
    check_pretrained,
    pretrain_once,
    recorded_weights,
    weights_named_by_trials,
    weights_record,
)
from tracking.contract import PRETRAINED_TAG, ROLE_TAG, Role
from tracking.mlflow_log import pretrained_of_trials

CFG = Config.from_dict({"classifier": "small_cnn", "purifier": "unet", "purifier_width": 4})
TINY = PretrainSettings(classifier_epochs=1, purifier_epochs=1, n_train=64, batch_size=32)


def _split(n: int = 64) -> Split:
    g = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def _classifier(cfg: Config = CFG, num_classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(1)
    return CLASSIFIERS[cfg.classifier](num_classes)


def _purifier(cfg: Config = CFG) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(2)
    return PURIFIERS[cfg.purifier](cfg.purifier_width), PatchDiscriminator()


def _dir(tmp_path, *, classifier="atop", purifier="atop"):
    """A --pretrained folder written by atop's own save functions (or a raw state dict)."""
    folder = tmp_path / "given"
    folder.mkdir()
    if classifier == "atop":
        save_checkpoint(folder / "classifier.pt", kind="classifier", cfg=CFG, classifier=_classifier())
    elif classifier == "state_dict":  # as RobustBench ships them: a wrapper and DataParallel's prefixes
        torch.save({"state_dict": {f"module.{k}": v for k, v in _classifier().state_dict().items()}},
                   folder / "classifier.pt")
    if purifier == "atop":
        gen, disc = _purifier()
        save_checkpoint(folder / "purifier.pt", kind="purifier", cfg=CFG, purifier=gen, discriminator=disc)
    return folder


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("classifier", ["atop", "state_dict"])
def test_given_weights_become_cache_entries_without_pretraining(tmp_path, classifier):
    folder, cache, logs = _dir(tmp_path, classifier=classifier), tmp_path / "cache", []
    given = check_pretrained(folder, CFG, TINY)
    assert given.classifier == folder / "classifier.pt" and given.purifier == folder / "purifier.pt"
    assert list(tmp_path.iterdir()) == [folder]  # checking writes nothing
    clf, pur = pretrain_once(CFG, TINY, _split(), cache, cpus=1, gpus=0, log=logs.append, pretrained=folder)
    assert clf.parent == cache and pur.parent == cache and len(logs) == 2 and "checked" in logs[0]
    assert _same(build_classifier(load_checkpoint(clf, kind="classifier")), _classifier())
    (gen, disc), (want_gen, want_disc) = build_purifier(load_checkpoint(pur, kind="purifier")), _purifier()
    assert _same(gen, want_gen) and _same(disc, want_disc)
    stamps = [p.stat().st_mtime_ns for p in (clf, pur)]
    # a second study reuses the entries; other bytes in DIR make other entries
    assert adopt_pretrained(folder, CFG, TINY, _split(), cache, log=logs.append) == (clf, pur)
    assert [p.stat().st_mtime_ns for p in (clf, pur)] == stamps and len(logs) == 2
    save_checkpoint(folder / "purifier.pt", kind="purifier", cfg=CFG, purifier=PURIFIERS["unet"](4),
                    discriminator=PatchDiscriminator())
    clf2, pur2 = adopt_pretrained(folder, CFG, TINY, _split(), cache, log=logs.append)
    assert clf2 == clf and pur2 != pur


def test_classifier_alone_then_the_purifier_pretrains_against_it(tmp_path):
    folder, cache, logs = _dir(tmp_path, purifier=None), tmp_path / "cache", []
    assert check_pretrained(folder, CFG, TINY).purifier is None
    clf, pur = adopt_pretrained(folder, CFG, TINY, _split(), cache, log=logs.append)
    assert pur is None
    # what pretrain_once's Ray task then runs: the given classifier is reused, only the purifier trains
    settings = dataclasses.replace(TINY, classifier_checkpoint=str(folder / "classifier.pt"))
    assert cache_paths(CFG, settings, _split(), cache)[0] == clf
    logs.clear()
    got = ensure_pretrained(CFG, settings, cache, train=_split(), log=logs.append)
    assert got[0] == clf and got[1].is_file()
    assert not any("pretrain classifier" in m for m in logs) and any("pretrain purifier" in m for m in logs)


def test_robustbench_style_wrn28_10_state_dict_is_adopted(tmp_path):
    """paper-cifar10's classifier from a RobustBench-style file (the keys WideResNet keeps)."""
    cfg = CFG.replace(classifier="wrn28_10")
    model = _classifier(cfg)
    folder = tmp_path / "given"
    folder.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "classifier.pt")
    assert {"block1.layer.0.convShortcut.weight", "block3.layer.3.conv2.weight", "bn1.running_var",
            "fc.weight"} <= set(model.state_dict())
    clf, pur = adopt_pretrained(folder, cfg, TINY, _split(), tmp_path / "cache", log=lambda m: None)
    assert pur is None and _same(build_classifier(load_checkpoint(clf, kind="classifier")), model)


def _corrupt(folder, name):
    path = folder / name
    path.write_bytes(path.read_bytes()[:700])


BAD = {
    "no folder": (lambda t: t / "missing", ["is not a folder", "classifier.pt"]),
    "a file": (lambda t: _dir(t) / "classifier.pt", ["is not a folder"]),
    "empty": (lambda t: _dir(t, classifier=None, purifier=None), ["holds no classifier.pt", "accepted"]),
    "purifier alone": (lambda t: _dir(t, classifier=None), ["holds no classifier.pt", "must come with it"]),
    "random bytes": (lambda t: (_dir(t) / "classifier.pt").write_bytes(b"\x00not torch" * 50) and t / "given",
                     ["classifier.pt", "does not load", "expected an atop classifier checkpoint"]),
    "truncated classifier": (lambda t: _corrupt(_dir(t), "classifier.pt") or t / "given",
                             ["classifier.pt", "does not load"]),
    "truncated purifier": (lambda t: _corrupt(_dir(t), "purifier.pt") or t / "given",
                           ["purifier.pt", "corrupt, truncated or not a torch file", "expected an atop purifier"]),
    "pickled module": (lambda t: torch.save(_classifier(), _dir(t) / "classifier.pt") or t / "given",
                       ["classifier.pt", "does not load", "safe (weights-only) load refuses"]),
    "other architecture": (lambda t: save_checkpoint(_dir(t) / "classifier.pt", kind="classifier",
                                                     cfg=CFG.replace(classifier="fast_cnn"),
                                                     classifier=_classifier(CFG.replace(classifier="fast_cnn"))).parent,
                           ["holds a 'fast_cnn' classifier", "expected", "small_cnn for cifar10"]),
    "other state dict": (lambda t: torch.save(CLASSIFIERS["fast_cnn"](10).state_dict(), _dir(t) / "classifier.pt")
                         or t / "given", ["does not fit small_cnn", "Missing key"]),
    "other classes": (lambda t: save_checkpoint(_dir(t) / "classifier.pt", kind="classifier",
                                                cfg=CFG.replace(dataset="cifar100"),
                                                classifier=_classifier(num_classes=100)).parent,
                      ["with 100 classes for cifar100", "(10 classes)"]),
    "other-class state dict": (lambda t: torch.save(_classifier(num_classes=100).state_dict(),
                                                    _dir(t) / "classifier.pt") or t / "given",
                               ["does not fit small_cnn", "head.weight"]),
    "purifier in classifier.pt": (lambda t: (_dir(t) / "purifier.pt").rename(t / "given" / "classifier.pt").parent,
                                  ["holds a 'purifier' checkpoint; expected 'classifier'"]),
    "other width": (lambda t: save_checkpoint(_dir(t) / "purifier.pt", kind="purifier",
                                              cfg=CFG.replace(purifier_width=8), purifier=PURIFIERS["unet"](8),
                                              discriminator=PatchDiscriminator()).parent,
                    ["purifier.pt", "holds a 'unet' purifier (width 8)", "(width 4)"]),
    "other dataset": (lambda t: save_checkpoint(_dir(t) / "purifier.pt", kind="purifier",
                                                cfg=CFG.replace(dataset="cifar100"), purifier=PURIFIERS["unet"](4),
                                                discriminator=PatchDiscriminator()).parent,
                      ["purifier.pt", "purifier (width 4) for cifar100", "for cifar10, with its discriminator"]),
    "no discriminator": (lambda t: save_checkpoint(_dir(t) / "purifier.pt", kind="purifier", cfg=CFG,
                                                   purifier=_purifier()[0]).parent,
                         ["purifier.pt", "holds no discriminator"]),
    "classifier in purifier.pt": (lambda t: save_checkpoint(_dir(t) / "purifier.pt", kind="classifier", cfg=CFG,
                                                            classifier=_classifier()).parent,
                                  ["purifier.pt", "holds a 'classifier' checkpoint; expected 'purifier'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pretrained_dir_is_a_one_line_error_before_anything_is_written(tmp_path, case):
    make, expected = BAD[case]
    folder = make(tmp_path)
    cache = tmp_path / "cache"
    for call in (lambda: check_pretrained(folder, CFG, TINY),
                 lambda: pretrain_once(CFG, TINY, _split(), cache, cpus=1, gpus=0, log=lambda m: None,
                                       pretrained=folder)):
        with pytest.raises(StudyError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg and ("accepted" in msg or "expected" in msg), msg
        for fragment in expected:
            assert fragment in msg, msg
    # both files are checked before either is stored: a bad purifier leaves no entry of its classifier
    assert not cache.exists() or not any(cache.iterdir())


def test_dir_and_classifier_checkpoint_setting_conflict(tmp_path):
    settings = dataclasses.replace(TINY, classifier_checkpoint=str(tmp_path / "x.pt"))
    with pytest.raises(StudyError, match="both give a classifier; accepted: one of them"):
        check_pretrained(_dir(tmp_path), CFG, settings)


def test_the_classifier_checkpoint_setting_is_checked_like_a_pretrained_classifier(tmp_path):
    """A study checks `pretrain.classifier_checkpoint` before anything starts (its pre-training task
    used to find a bad file, after the study and Ray had started)."""
    folder = _dir(tmp_path, purifier=None)
    check_classifier_checkpoint(str(folder / "classifier.pt"), CFG)
    (tmp_path / "junk.pt").write_bytes(b"\x00not torch" * 50)
    bad = {"junk.pt": "does not load", "absent.pt": "does not exist", "given": "is a folder"}
    for name, why in bad.items():
        with pytest.raises(StudyError, match=rf"^classifier_checkpoint '.*{name}' {why}.*expected an atop classifier"):
            check_classifier_checkpoint(str(tmp_path / name), CFG)
    with pytest.raises(StudyError, match="holds a 'small_cnn' classifier .* expected .*fast_cnn"):
        check_classifier_checkpoint(str(folder / "classifier.pt"), CFG.replace(classifier="fast_cnn"))


def test_a_resumed_study_gets_the_weights_it_recorded_or_a_one_line_refusal(tmp_path):
    """study.json records each weight file's name and sha256; a resume takes exactly those files from
    the cache (never pre-trains again: the cache key hashes the code, which may have changed since)."""
    clf, pur = tmp_path / "classifier-small_cnn-abc.pt", tmp_path / "purifier-unet-def.pt"
    clf.write_bytes(b"classifier bytes")
    pur.write_bytes(b"purifier bytes")
    record = weights_record(clf, pur)
    assert record["classifier"]["file"] == clf.name and len(record["purifier"]["sha256"]) == 64
    assert recorded_weights(tmp_path, record) == (clf, pur)
    pur.write_bytes(b"another purifier")
    with pytest.raises(StudyError, match=r"^--resume: the study's pre-trained purifier .* is missing or changed"):
        recorded_weights(tmp_path, record)
    clf.unlink()
    with pytest.raises(StudyError, match="pre-trained classifier"):
        recorded_weights(tmp_path, record)
    with pytest.raises(StudyError, match="weights record"):
        recorded_weights(tmp_path, {"classifier": "x"})


def test_a_study_from_before_the_record_gets_the_weights_its_trial_runs_name(tmp_path):
    """A study.json without `weights` (studies started before the record): the resume takes the files
    its trial runs' tag names, in a real MLflow store, oldest first; a study with no trial yet may pre-train."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert pretrained_of_trials(uri, "s") == []  # no experiment yet
    client = MlflowClient(uri)
    exp = client.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())
    for start, role, files in ((1, Role.STUDY, "x.pt,y.pt"), (2, Role.TRIAL, "c1.pt,p1.pt"), (3, Role.TRIAL, "c1.pt,p1.pt"),
                               (4, Role.TRIAL, "c2.pt,p2.pt"), (5, Role.CONFIRM_SEED, "z.pt,w.pt")):
        client.create_run(exp, start_time=start, tags={ROLE_TAG: role.value, PRETRAINED_TAG: files})
    named = pretrained_of_trials(uri, "s")
    assert named == ["c1.pt,p1.pt", "c2.pt,p2.pt"]

    for name in ("c1.pt", "p1.pt"):
        (tmp_path / name).write_bytes(b"weights")
    said: list[str] = []
    assert weights_named_by_trials(tmp_path, named, log=said.append) == (tmp_path / "c1.pt", tmp_path / "p1.pt")
    assert len(said) == 1 and "different pre-trained weights" in said[0] and "(c1.pt,p1.pt)" in said[0]
    assert weights_named_by_trials(tmp_path, []) is None
    with pytest.raises(StudyError, match=r"^--resume: the study's pre-trained purifier .*p2.pt' .* is missing"):
        weights_named_by_trials(tmp_path, ["c1.pt,p2.pt"])
    for bad in ("c1.pt", "c1.pt,", "../c1.pt,p1.pt"):
        with pytest.raises(StudyError, match="is not one this driver wrote"):
            weights_named_by_trials(tmp_path, [bad])
