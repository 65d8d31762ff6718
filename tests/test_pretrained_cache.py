"""The pre-trained weights cache: keys (settings, data, code), reuse, refusal of bad files, atomic writes."""
import dataclasses
import threading

import pytest
import torch

from atop.checkpoint import load_checkpoint, save_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.config import Config
from atop.data import Split, load_split, subset
from atop.io import atomic_write_bytes
from atop.models import CLASSIFIERS
from atop.presets import PretrainSettings
from atop.pretrain import ensure_pretrained
from atop.pretrained_cache import cache_paths, code_fingerprint, import_classifier

CFG = Config.from_dict({"classifier": "small_cnn", "purifier": "unet", "purifier_width": 4})
TINY = PretrainSettings(classifier_epochs=1, purifier_epochs=1, n_train=64, batch_size=32)


def _split(n: int = 64, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8), torch.arange(n) % 10)


def test_keys_follow_settings_data_and_code(tmp_path):
    train = _split()
    clf, pur = cache_paths(CFG, TINY, train, tmp_path, code="v1")
    assert (clf, pur) == cache_paths(CFG, TINY, Split(train.x.clone(), train.y.clone()), tmp_path, code="v1")
    # a classifier setting moves both entries (the purifier learns against that classifier)
    clf2, pur2 = cache_paths(CFG, dataclasses.replace(TINY, classifier_epochs=2), train, tmp_path, code="v1")
    assert clf2 != clf and pur2 != pur
    # a purifier-only setting keeps the classifier
    clf3, pur3 = cache_paths(CFG, dataclasses.replace(TINY, purifier_ce_weight=0.1), train, tmp_path, code="v1")
    assert clf3 == clf and pur3 != pur
    # one changed pixel, one changed label, other code: all miss
    x = train.x.clone()
    x[0, 0, 0, 0] ^= 1
    assert cache_paths(CFG, TINY, Split(x, train.y), tmp_path, code="v1")[0] != clf
    assert cache_paths(CFG, TINY, Split(train.x, train.y.roll(1)), tmp_path, code="v1")[0] != clf
    assert cache_paths(CFG, TINY, train, tmp_path, code="v2")[0] != clf


def test_code_fingerprint_follows_the_source(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "h4_fp_mod.py").write_text("X = 1\n")
    before = code_fingerprint(("h4_fp_mod",))
    assert before == code_fingerprint(("h4_fp_mod",))
    (tmp_path / "h4_fp_mod.py").write_text("X = 2\n")
    assert code_fingerprint(("h4_fp_mod",)) != before
    assert len(code_fingerprint()) == 64  # the real modules are all found


def test_second_call_reuses_without_training(tmp_path):
    train, logs = _split(), []
    first = ensure_pretrained(CFG, TINY, tmp_path, train=train, log=logs.append)
    assert any("pretrain classifier" in m for m in logs) and any("pretrain purifier" in m for m in logs)
    stamps = [p.stat().st_mtime_ns for p in first]
    logs.clear()
    assert ensure_pretrained(CFG, TINY, tmp_path, train=train, log=logs.append) == first
    assert not any("pretrain" in m for m in logs) and sum("reusing" in m for m in logs) == 2
    assert [p.stat().st_mtime_ns for p in first] == stamps
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind
    # a purifier-only change reuses the classifier and trains only a new purifier
    logs.clear()
    clf, pur = ensure_pretrained(CFG, dataclasses.replace(TINY, purifier_gan_weight=0.5), tmp_path, train=train,
                                 log=logs.append)
    assert clf == first[0] and pur != first[1]
    assert not any("pretrain classifier" in m for m in logs) and any("pretrain purifier" in m for m in logs)


@pytest.mark.parametrize("which", [0, 1])
def test_a_corrupt_entry_is_refused_in_one_line(tmp_path, which):
    train = _split()
    paths = ensure_pretrained(CFG, TINY, tmp_path, train=train, log=lambda m: None)
    paths[which].write_bytes(paths[which].read_bytes()[:1000])  # truncated by something outside atop
    with pytest.raises(CheckpointError) as info:
        ensure_pretrained(CFG, TINY, tmp_path, train=train, log=lambda m: None)
    msg = str(info.value)
    assert str(paths[which]) in msg and "delete it to rebuild" in msg and "\n" not in msg


def test_concurrent_writers_never_leave_half_a_file(tmp_path):
    target = tmp_path / "entry.pt"
    payloads = [bytes([i]) * (1 << 20) for i in range(6)]
    seen, stop = [], threading.Event()

    def read_loop():
        while not stop.is_set():
            if target.exists():
                seen.append(target.read_bytes())

    reader = threading.Thread(target=read_loop)
    reader.start()
    writers = [threading.Thread(target=lambda p=p: [atomic_write_bytes(target, p) for _ in range(5)]) for p in payloads]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert target.read_bytes() in payloads
    assert seen and all(data in payloads for data in seen)  # every read saw one whole payload
    assert [p.name for p in tmp_path.iterdir()] == ["entry.pt"]


def test_given_classifier_file_is_checked_and_cached(tmp_path):
    model = CLASSIFIERS["small_cnn"](10)
    raw = tmp_path / "robustbench_style.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, raw)
    out = import_classifier(raw, CFG, tmp_path / "cache" / "clf.pt")
    loaded = load_checkpoint(out, kind="classifier")["classifier"]["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    settings = dataclasses.replace(TINY, classifier_checkpoint=str(raw))
    clf, _ = ensure_pretrained(CFG, settings, tmp_path / "cache", train=_split(), log=lambda m: None)
    torch.save(CLASSIFIERS["small_cnn"](10).state_dict(), raw)  # other weights in the same file: a new key
    assert cache_paths(CFG, settings, _split(), tmp_path / "cache")[0] != clf


@pytest.mark.parametrize("content, expected", [
    (b"not a torch file", "does not load"),
    ("resnet18", "does not fit small_cnn"),
    ({"epoch": 3}, "holds no state dict"),
    ("atop-resnet18", "holds a 'resnet18' classifier"),
    ("atop-cifar100", "holds a 'small_cnn' classifier with 100 classes for cifar100"),
])
def test_foreign_classifier_file_is_a_one_line_error(tmp_path, content, expected):
    path = tmp_path / "foreign.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "atop-resnet18":
        save_checkpoint(path, kind="classifier", cfg=CFG.replace(classifier="resnet18"),
                        classifier=CLASSIFIERS["resnet18"](10))
    elif content == "atop-cifar100":  # same architecture, another head: refused, not built with 100 classes
        save_checkpoint(path, kind="classifier", cfg=CFG.replace(dataset="cifar100"),
                        classifier=CLASSIFIERS["small_cnn"](100))
    elif content == "resnet18":
        torch.save(CLASSIFIERS["resnet18"](10).state_dict(), path)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        import_classifier(path, CFG, tmp_path / "out.pt")
    msg = str(info.value)
    assert str(path) in msg and expected in msg and "expected" in msg and "\n" not in msg
    assert not (tmp_path / "out.pt").exists()


def test_missing_classifier_file_is_named(tmp_path):
    settings = dataclasses.replace(TINY, classifier_checkpoint=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="nope.pt.*does not exist"):
        ensure_pretrained(CFG, settings, tmp_path, train=_split(), log=lambda m: None)


def test_real_data_fingerprint_is_stable(cifar_dir):
    full = load_split("cifar10", "train", cifar_dir)
    train, again, other = subset(full, 1000, seed=0), subset(full, 1000, seed=0), subset(full, 1000, seed=1)
    key = cache_paths(CFG, TINY, train, "c", code="v")
    assert key == cache_paths(CFG, TINY, again, "c", code="v") != cache_paths(CFG, TINY, other, "c", code="v")


def test_studies_of_other_validation_counts_and_atop_run_share_the_cached_weights(cifar_dir, tmp_path):
    """reproduce-cpu scores on 256 validation images and cifar10-cpu on 512, with the same pre-training:
    both pre-train on the images the validation reserve leaves, so the later one finds the earlier one's
    cached weights, and so does `atop.run` (`training_pool`)."""
    from atop.data import training_pool
    from atop.presets import get_preset
    from study.run import build_parser, prepare

    found = {}
    for preset in ("cifar10-cpu", "reproduce-cpu"):
        plan = prepare(build_parser().parse_args([
            "--preset", preset, "--data-dir", str(cifar_dir), "--storage-path", str(tmp_path / "studies"),
            "--study-name", preset]))
        found[preset] = (len(plan.val), cache_paths(plan.cfg, plan.settings.pretrain_settings(),
                                                    plan.pretraining_data, tmp_path, code="v1"))
    assert found["cifar10-cpu"][0] == 512 and found["reproduce-cpu"][0] == 256
    assert found["cifar10-cpu"][1] == found["reproduce-cpu"][1]
    assert not (tmp_path / "studies").exists()  # prepare created nothing
    preset = get_preset("cifar10-cpu")  # as atop.run --preset cifar10-cpu builds its config and data
    run_cfg = Config.from_dict(preset.config)
    run_data = subset(training_pool(load_split("cifar10", "train", cifar_dir)), preset.pretrain.n_train,
                      seed=run_cfg.seed)
    assert cache_paths(run_cfg, preset.pretrain, run_data, tmp_path, code="v1") == found["cifar10-cpu"][1]
