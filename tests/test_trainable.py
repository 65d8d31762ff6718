"""The trainable's adapter pieces on tiny synthetic data (no Ray needed)."""
from __future__ import annotations

import pytest
import torch

from atop.checkpoint import classifier_reference, load_checkpoint, save_checkpoint
from atop.checkpoint_file import CheckpointError
from atop.config import Config, ConfigError
from atop.data import Split
from atop.finetune import finetune
from atop.models import CLASSIFIERS, PURIFIERS, PatchDiscriminator
from tracking.contract import RUN_ID, TRIAL_NUMBER
from trainables.atop_trainable import split_config
from trainables.trial_state import DEFENSE_FILE, STATE_FILE, restore_state, save_state
from trainables.worker import (
    PERMANENT,
    DeviceError,
    failure_message,
    memory_fraction,
    select_device,
    trial_device,
)

CFG = Config.from_dict({"n_train": 16, "n_eval": 8, "epochs": 2, "batch_size": 8, "purifier_width": 4,
                        "rt": "rt3", "num_masks": 2, "unseen_attacks": "fgsm_linf"})


def _data(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _models():
    torch.manual_seed(0)
    return CLASSIFIERS["small_cnn"](10), PURIFIERS["unet"](4), PatchDiscriminator()


def test_split_config_rejects_unknown_keys_and_keeps_trial_keys():
    cfg, reserved = split_config({**CFG.to_dict(), TRIAL_NUMBER: 3, RUN_ID: "abc"})
    assert cfg == CFG and reserved == {TRIAL_NUMBER: 3, RUN_ID: "abc"}
    with pytest.raises(ConfigError, match="lamda"):
        split_config({**CFG.to_dict(), "lamda": 1})


def _ref(clf: torch.nn.Module, tmp_path) -> dict:
    """The classifier reference a trial makes from the bytes of the study's classifier file."""
    return classifier_reference(save_checkpoint(tmp_path / "clf.pt", kind="classifier", cfg=CFG,
                                                classifier=clf).read_bytes())


def test_checkpoint_roundtrip_resumes_to_the_same_result(tmp_path):
    train, test = _data(16, 0), _data(8, 1)
    clf, pur, disc = _models()
    reports = list(finetune(CFG, clf, pur, disc, train, test))
    clf2, pur2, disc2 = _models()
    first = next(finetune(CFG, clf2, pur2, disc2, train, test))
    ref = _ref(clf2, tmp_path)
    folder = tmp_path / "checkpoint_000000"
    folder.mkdir()
    save_state(folder, CFG, first, ref, pur2, disc2, compute_s=1.5)
    assert "classifier" not in load_checkpoint(folder / DEFENSE_FILE)  # by reference only
    state, start, compute_s = restore_state(folder, ref)
    assert (start, compute_s) == (1, 1.5)
    clf3, pur3, disc3 = _models()
    resumed = list(finetune(CFG, clf3, pur3, disc3, train, test, state=state, start_epoch=start))
    assert len(resumed) == 1 and resumed[0].epoch == 2
    assert resumed[0].metrics["loss/total"] == pytest.approx(reports[1].metrics["loss/total"], rel=1e-4)


def test_restore_refuses_a_checkpoint_of_another_classifier_and_reads_old_self_contained_ones(tmp_path):
    train, test = _data(16, 0), _data(8, 1)
    clf, pur, disc = _models()
    first = next(finetune(CFG.replace(epochs=1), clf, pur, disc, train, test))
    (tmp_path / "new").mkdir()
    save_state(tmp_path / "new", CFG, first, _ref(clf, tmp_path), pur, disc, compute_s=1.0)
    other = _ref(CLASSIFIERS["small_cnn"](10), tmp_path / "new")
    with pytest.raises(CheckpointError, match="made with classifier sha256") as info:
        restore_state(tmp_path / "new", other)
    assert other["sha256"] in str(info.value) and "\n" not in str(info.value)
    # a Tune checkpoint of the code before references (classifier embedded) still resumes
    (tmp_path / "old").mkdir()
    save_checkpoint(tmp_path / "old" / DEFENSE_FILE, kind="defense", cfg=CFG, classifier=clf, purifier=pur,
                    discriminator=disc, optimizers=first.state["optimizers"], epoch=1, metrics=first.metrics)
    torch.save({"generator": None, "compute_s": 2.0}, tmp_path / "old" / STATE_FILE)
    state, start, compute_s = restore_state(tmp_path / "old", other)
    assert (start, compute_s) == (1, 2.0) and set(state) == {"purifier", "discriminator", "optimizers"}


def test_device_selection_and_memory_cap():
    assert select_device(0, cuda_available=False).type == "cpu"
    assert select_device(0.0, cuda_available=True).type == "cpu"
    assert select_device(0.25, cuda_available=True).type == "cuda"
    assert select_device(2, cuda_available=True).type == "cuda"
    with pytest.raises(DeviceError, match=r"gpus_per_trial=0.5 but CUDA is not available") as info:
        select_device(0.5, cuda_available=False)
    assert "--gpus 0" in str(info.value) and "\n" not in str(info.value)
    assert DeviceError in PERMANENT and torch.cuda.OutOfMemoryError in PERMANENT  # no Tune retry
    assert [memory_fraction(g) for g in (0, 0.25, 0.5, 1, 2)] == [None, 0.25, 0.5, None, None]
    assert isinstance(memory_fraction(0.5), float)  # torch.cuda.set_per_process_memory_fraction wants a float


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a node without CUDA")
def test_a_gpu_trial_on_a_node_without_cuda_fails_instead_of_running_on_the_cpu():
    with pytest.raises(DeviceError, match="CUDA is not available"):
        trial_device(0.5)
    assert trial_device(0.0).type == "cpu"


def test_cuda_out_of_memory_names_the_batch_size_and_the_gpu_share():
    exc = torch.cuda.OutOfMemoryError(
        "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 139.81 GiB of which\n"
        "1.20 GiB is free. Including non-PyTorch memory, this process has 34.95 GiB memory in use.")
    msg = failure_message(exc, CFG, 0.25)
    assert "batch_size=8" in msg and "capped to 0.25 of the GPU's memory" in msg, msg
    assert "Tried to allocate 2.00 GiB" in msg and "\n" not in msg, msg
    whole = failure_message(exc, CFG.replace(batch_size=512), 1)
    assert "batch_size=512" in whole and "gpus_per_trial=1, no memory cap" in whole, whole
    assert failure_message(FloatingPointError("loss is nan"), CFG, 0.25) == "FloatingPointError: loss is nan"
