"""bench/: the baseline and our FT step do equal work (so a ratio compares like with like), bf16
stays within its tolerance, and `python -m bench` runs at a tiny size and writes its schema.
No timing is asserted: this machine is shared and noisy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.core import TINY, Result
from bench.ft_step import (
    BF16_TOLERANCE,
    FP32_TOLERANCE,
    BaselineRun,
    OursStep,
    bench_config,
    build_models,
    loss_difference,
)

ROOT = Path(__file__).resolve().parents[1]


def batch(n=TINY.batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def assert_close_dicts(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max().item())


def assert_same_updates(ours, base, base_grads, rtol, noise_level=1e-3):
    """Equal parameters after the Adam step. Adam's first steps are about lr * sign(grad), so where
    a gradient is zero in exact math (a conv bias before a one-channel GroupNorm group) float noise
    picks the sign, and where a gradient is a sum that cancels to near zero its float error is large
    relative to it: there (|grad| below 1e-6, or below `noise_level` of the tensor's largest) the two may
    differ by up to 2 lr, and only there."""
    noise = {k: (g.abs() < 1e-6) | (g.abs() < noise_level * g.abs().max()) for k, g in base_grads.items()}
    for k, p in ours.named_parameters():
        q = dict(base.named_parameters())[k]
        bad = ~torch.isclose(p, q, rtol=rtol, atol=1e-6)
        assert not (bad & ~noise[k]).any(), (k, (p - q).abs().max().item())
        assert ((p - q).abs() <= 2.2 * 1e-4).all(), k


# The baseline's own precision and format. (channels_last picks other convolution algorithms, so
# FGSM's sign(grad) flips on a few near-zero pixels, moving them by 2 eps, and Adam's sign-like first
# steps amplify that: NHWC is checked on losses, like bf16, in the next test.)
@pytest.mark.parametrize("overrides,rtol,grad_rtol", [({}, 1e-4, 1e-3)])
def test_baseline_and_ours_compute_the_same_losses_gradients_and_updates(overrides, rtol, grad_rtol):
    models = build_models(TINY, torch.device("cpu"))
    x, y = batch()
    ours = OursStep(bench_config(TINY, **overrides), models, torch.device("cpu"))
    base = BaselineRun(bench_config(TINY), models)
    assert_close_dicts(params(ours.trainer.purifier), params(base.step.purifier), 0, 0)  # same start
    for _ in range(2):  # the second step starts from the first one's updated weights and Adam state
        got, want = ours(x, y), base(x, y)
        assert torch.allclose(got, want, rtol=rtol, atol=1e-5), (got, want)
        assert got[3] > 0  # the CE term is on: the classifier path is part of the compared work
        g_ours = {k: p.grad for k, p in ours.trainer.purifier.named_parameters()}
        g_base = {k: p.grad for k, p in base.step.purifier.named_parameters()}
        for k, want in g_base.items():  # float error of a gradient scales with the tensor's largest entry
            atol = 1e-6 + grad_rtol * want.abs().max().item()
            assert torch.allclose(g_ours[k], want, rtol=grad_rtol, atol=atol), k
        assert_same_updates(ours.trainer.purifier, base.step.purifier, g_base, rtol, grad_rtol)
        # D's gradients of the D step: ours keeps them (its G step leaves D's .grad alone), the
        # baseline's G step adds its own on top (wasted work the next D step throws away).
        d_grads = {k: p.grad for k, p in ours.trainer.discriminator.named_parameters()}
        assert_same_updates(ours.trainer.discriminator, base.step.discriminator, d_grads, rtol, grad_rtol)
    assert all(p.grad is None for p in ours.trainer.classifier.parameters())  # frozen on both sides


@pytest.mark.parametrize("overrides,tolerance", [({"channels_last": True}, FP32_TOLERANCE),
                                                 ({"precision": "bf16", "channels_last": True}, BF16_TOLERANCE)])
def test_speed_switches_stay_within_the_stated_tolerance_of_fp32(overrides, tolerance):
    models = build_models(TINY, torch.device("cpu"))
    x, y = batch()
    fp32 = OursStep(bench_config(TINY), models, torch.device("cpu"))
    fast = OursStep(bench_config(TINY, **overrides), models, torch.device("cpu"))
    for _ in range(2):
        diff = loss_difference(fast(x, y), fp32(x, y))
        assert diff <= tolerance, diff


def test_result_ratio_and_schema():
    r = Result("FT step fp32", ours=30.0, baseline=10.0, unit="img/s", repeats=5, notes="n")
    d = r.to_dict()
    assert d["ratio"] == 3.0
    assert {"row", "ours", "baseline", "ratio", "unit", "repeats", "notes"} <= d.keys()


def test_python_m_bench_runs_at_a_tiny_size_and_writes_bench_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--tiny", "--quick", "--repeats", "2", "--rows", "ft_step,attack",
                           "--out", str(tmp_path)],  # the study rows run real studies: CI runs them in .ci/run
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench.json").read_text())
    assert {"torch", "threads", "device", "device_name", "cpu_model"} <= report["machine"].keys()
    rows = {r["row"]: r for r in report["rows"]}
    for name in ("FT step fp32", "FT step channels_last", "FT step bf16+channels_last", "attack PGD-EOT batched"):
        assert name in rows, sorted(rows)
    assert any(name.startswith("share of peak") for name in rows)
    for r in report["rows"]:
        assert {"row", "ours", "baseline", "ratio", "unit", "repeats", "notes"} <= r.keys()
        assert r["ours"] > 0 and r["baseline"] > 0 and r["repeats"] == 2
    assert rows["FT step fp32"]["loss_diff"] <= rows["FT step fp32"]["tolerance"]
    assert "row" in proc.stdout and "FT step fp32" in proc.stdout  # the table is printed


def test_bad_arguments_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "--rows", "nope", "--out", str(tmp_path)],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown row" in proc.stderr


@pytest.mark.parametrize("content", [b"", b"not an npz at all", b"PK\x03\x04 truncated zip"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_a_bad_data_file_is_refused_before_any_row_runs(content, split, tmp_path, capsys):
    from bench.__main__ import main
    from tests.conftest import data_dir

    data = tmp_path / "data"
    data.mkdir()
    (data / f"cifar10_{split}.npz").write_bytes(content)
    other = f"cifar10_{'test' if split == 'train' else 'train'}.npz"
    (data / other).symlink_to(data_dir() / other)  # the other split is the real one
    out = tmp_path / "out"
    assert main(["--rows", "ft_step", "--tiny", "--data-dir", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --data-dir") and f"cifar10_{split}.npz" in err[0], err
    assert not out.exists()


def test_synthetic_trial_has_the_shape_the_sampler_rows_assume():
    """More transform: less clean, more robust; a good lr beats a bad one; noise is 512-image binomial."""
    import numpy as np

    from bench.samplers import N_EVAL, hypervolume_trace, synthetic_objectives

    base = {"rt": "rt2", "mask_ratio": 0.25, "noise_std": 0.1, "block_size": 4, "train_attack": "fgsm",
            "train_norm": "linf", "train_eps": 8 / 255, "train_grad_path": "classifier", "lambda_ce": 0.1,
            "lr": 1e-4}
    mild, strong = synthetic_objectives(base), synthetic_objectives({**base, "noise_std": 0.4})
    assert strong[0] < mild[0] and strong[1] > mild[1] and strong[2] > mild[2]
    assert synthetic_objectives({**base, "lr": 1e-3})[0] < mild[0]
    noisy = np.array([synthetic_objectives(base, np.random.default_rng(s)) for s in range(200)])
    assert np.allclose(noisy.mean(0), mild, atol=0.01)
    assert np.allclose(noisy * N_EVAL, np.round(noisy * N_EVAL))  # whole images
    trace = hypervolume_trace("tpe", concurrency=4, n_trials=12, seed=0)
    assert len(trace) == 12 and np.all(np.diff(trace) >= 0) and trace[-1] > 0


def test_bench_precision_compares_bf16_with_fp32_on_one_checkpoint(tmp_path, capsys):
    from atop.checkpoint import save_checkpoint
    from atop.config import Config
    from atop.models import CLASSIFIERS, UNetPurifier
    from bench.precision import main, paired_difference
    from tests.conftest import data_dir

    cfg = Config.from_dict({"purifier": "unet", "purifier_width": 4, "classifier": "small_cnn", "batch_size": 4,
                            "unseen_attacks": "fgsm_linf"})
    ckpt = save_checkpoint(tmp_path / "defense.pt", kind="defense", cfg=cfg, classifier=CLASSIFIERS["small_cnn"](10),
                           purifier=UNetPurifier(4))
    assert main(["--checkpoint", str(ckpt), "--n-images", "4", "--level", "screen",
                 "--data-dir", str(data_dir())]) == 0
    out = capsys.readouterr().out
    assert "(fp32) vs the same in bf16" in out and "robust_acc_seen" in out and "wall time: fp32" in out
    assert paired_difference(torch.ones(5).numpy(), torch.ones(5).numpy()) == (0.0, 0.0, 0.0)
    diff, lo, hi = paired_difference(torch.zeros(50).numpy(), torch.ones(50).numpy())
    assert diff == lo == hi == 1.0
    assert main(["--checkpoint", str(ckpt), "--n-images", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --n-images=0")


def test_moasha_learning_curve_starts_at_the_pretrained_defense_and_ends_at_the_trial():
    """Epoch 1 is near the defense without fine-tuning; the last epoch is the trial's objectives;
    lambda_ce changes nothing before the CE warm-up has ended."""
    import numpy as np

    from bench.moasha import learning_curve
    from bench.samplers import synthetic_objectives

    p = {"rt": "rt2", "mask_ratio": 0.25, "noise_std": 0.1, "block_size": 4, "train_attack": "pgd",
         "train_norm": "linf", "train_eps": 8 / 255, "train_grad_path": "classifier", "lambda_ce": 0.3,
         "lr": 1e-4, "ce_warmup_epochs": 2}
    curve = learning_curve(p, 10)
    assert curve.shape == (10, 3)
    assert np.allclose(curve[-1], synthetic_objectives(p))
    untrained = synthetic_objectives({**p, "lambda_ce": 0.0, "lr": 1e-7})
    assert np.abs(curve[0] - untrained).max() < np.abs(curve[-1] - untrained).max()
    no_adv = learning_curve({**p, "lambda_ce": 0.0}, 10)
    assert np.allclose(curve[:2], no_adv[:2]) and not np.allclose(curve[2:], no_adv[2:])


def test_moasha_simulation_stops_trials_at_rungs_and_spends_the_freed_time_on_new_ones():
    import math

    import numpy as np

    from bench.moasha import Pair, Setting, simulate
    from study.scheduler import rungs

    # the first trials at a rung mostly continue (3 objectives: most vectors are non-dominated)
    setting = Setting(epochs=4, concurrency=2, n_trials=16, grace_period=1, reduction_factor=2, sampler="random")
    none = simulate(setting, "none", seed=0)
    assert none.started == len(none.times) == 16 and not none.stopped_at
    assert none.epochs_run == 16 * 4
    mo = simulate(setting, "mo-asha", seed=0, until=none.end)
    assert mo.stopped_at and set(mo.stopped_at) <= set(rungs(1, 2, 4))
    assert mo.started > none.started  # freed slots went to new trials
    assert mo.started == len(mo.times) + len(mo.stopped_at)
    pair = Pair(none, mo)
    ratio = pair.time_to_none_hv()
    assert ratio == math.inf or 0 < ratio <= 1
    assert Pair(none, none).time_to_none_hv() <= 1  # an arm reaches its own hypervolume by its end
    assert np.allclose(pair.none.by(math.inf), np.array(none.true))


def test_the_moasha_oracle_decides_on_each_trial_s_exact_final_objectives(monkeypatch):
    import dataclasses

    import numpy as np

    from bench import moasha

    finals: list[list[float]] = []
    seen: list[list[float]] = []
    curve, decide = moasha.learning_curve, moasha.decide

    def recorded_curve(p, epochs):
        out = curve(p, epochs)
        finals.append(out[-1].tolist())
        return out

    def recorded_decide(records, vector, eta):
        seen.append(list(vector))
        return decide(records, vector, eta)

    monkeypatch.setattr(moasha, "learning_curve", recorded_curve)
    monkeypatch.setattr(moasha, "decide", recorded_decide)
    setting = moasha.Setting(epochs=4, concurrency=2, n_trials=8, grace_period=1, reduction_factor=2, sampler="random")
    for oracle in (True, False):
        finals.clear()
        seen.clear()
        moasha.simulate(dataclasses.replace(setting, oracle=oracle), "mo-asha", seed=0, until=12.0)
        assert seen  # rungs were reached: the case holds
        exact = [any(np.array_equal(v, f) for f in finals) for v in seen]
        assert all(exact) if oracle else not any(exact)  # without it: the epoch's noisy 512-image figures


def test_idle_breakdown_splits_a_trial_phase_s_idle_slot_seconds():
    from datetime import datetime, timedelta
    from types import SimpleNamespace

    from bench.study_rows import idle_breakdown
    from tracking.contract import COMPUTE_S

    t0 = datetime(2026, 12, 1)

    def trial(start: float, end: float, compute: float) -> SimpleNamespace:
        return SimpleNamespace(datetime_start=t0 + timedelta(seconds=start), datetime_complete=t0 + timedelta(seconds=end),
                               user_attrs={COMPUTE_S: compute})

    # two slots: A runs 0-10 then 10.5-20, B runs 0-12 then the last trial 12-30; A idles 20-30
    trials = [trial(0, 10, 8), trial(0, 12, 9), trial(10.5, 20, 9), trial(12, 30, 17.5)]
    out = idle_breakdown(trials, concurrency=2)
    assert out["idle"] == pytest.approx(60 - 43.5)
    assert out["first_trials"] == pytest.approx(2 + 3) and out["trial_ends"] == pytest.approx(0.5 + 0.5)
    assert out["tail"] == pytest.approx(10) and out["between"] == pytest.approx(0.5)  # A's 10-10.5
