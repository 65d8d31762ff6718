"""One typed, flat config for a fine-tuning run.

The same object is what Optuna suggests into, what a Ray Tune trainable receives, what MLflow logs
(`asdict(cfg)`) and what every checkpoint carries. `Config.from_dict` is the only way in from the
outside: it rejects unknown keys, converts strings to the right types and checks every range, and
raises `ConfigError` with a one-line message naming the bad value and what would be accepted.
"""
from __future__ import annotations

import dataclasses
import enum
import math
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from atop import names
from atop.threat import Norm, pgd_step_size


class ConfigError(ValueError):
    """A bad configuration value; its message is one line naming the value and what is accepted."""


class RTType(str, enum.Enum):
    """Random transform families of the AToP paper; each has an entry in `atop.transforms.TRANSFORMS`."""

    RT1 = "rt1"  # random mask
    RT2 = "rt2"  # Gaussian noise, then random mask
    RT3 = "rt3"  # noise, then N disjoint masks, each inpainted, filled pixels combined


class DefenseKind(str, enum.Enum):
    """What stands in front of the classifier."""

    FULL = "full"  # RT -> purifier -> classifier: what AToP fine-tunes
    CLASSIFIER = "classifier"  # the classifier alone: a baseline to score, never fine-tuned (epochs 0)


class TrainAttack(str, enum.Enum):
    FGSM = "fgsm"
    PGD = "pgd"


class GradPath(str, enum.Enum):
    """Which model the training attack differentiates."""

    CLASSIFIER = "classifier"  # the authors' code: perturb against f alone
    DEFENSE = "defense"  # the paper's formula: through RT + purifier + classifier, with EOT


class L1Target(str, enum.Enum):
    CLEAN = "clean"
    ADVERSARIAL = "adversarial"


class EvalLevel(str, enum.Enum):
    """How strong an evaluation's attacks are (budgets in `atop.evaluate.LEVELS`)."""

    SCREEN = "screen"  # cheap, inside every trial's epochs: for comparing trials, not a final figure
    LIGHT = "light"  # full's attacks and audit at a CPU-sized budget: a confirm level for CPUs
    FULL = "full"  # the standard budget of a final robustness figure


class Precision(str, enum.Enum):
    FP32 = "fp32"
    BF16 = "bf16"


@dataclass(frozen=True)
class Config:
    """Every setting of one AToP fine-tuning run (flat: Optuna and MLflow see the same names)."""

    # data
    dataset: str = "cifar10"
    n_train: int = 512  # training images (a seeded subset of the train split; 0 = all)
    n_eval: int = 64  # evaluation images (the first n of the test split)
    seed: int = 0
    # models
    classifier: str = "small_cnn"
    purifier: str = "unet"
    purifier_width: int = 16
    defense: DefenseKind = DefenseKind.FULL
    # random transform
    rt: RTType = RTType.RT2
    mask_ratio: float = 0.25  # fraction of blocks removed (RT1/RT2)
    block_size: int = 4  # mask block side in pixels (the paper: 1/8 of the image side)
    noise_std: float = 0.25  # Gaussian noise std on the [0,1] scale (RT2/RT3)
    num_masks: int = 4  # disjoint masks covering the image (RT3)
    # training attack
    train_attack: TrainAttack = TrainAttack.FGSM
    train_norm: Norm = Norm.LINF
    train_eps: float = 8 / 255
    train_steps: int = 1  # PGD steps (FGSM: always one)
    train_step_size: float = 0.0  # 0 = eps for FGSM, `pgd_step_size` for PGD
    train_random_start: bool = False
    train_grad_path: GradPath = GradPath.CLASSIFIER
    train_eot: int = 1  # EOT samples when the gradient passes the random defense
    # losses and optimizer
    lambda_ce: float = 0.1
    gan_weight: float = 1.0
    l1_weight: float = 1.0
    ce_warmup_epochs: int = 0  # epochs of L_gen only before the CE term is switched on
    l1_target: L1Target = L1Target.ADVERSARIAL
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    epochs: int = 2
    batch_size: int = 64
    # evaluation
    eval_level: EvalLevel = EvalLevel.SCREEN
    eval_eps_linf: float = 8 / 255
    eval_eps_l2: float = 0.5
    unseen_attacks: str = "pgd_l2,apgd_dlr_linf"  # comma-separated names from atop.attacks.ATTACKS
    # the defense's forward passes while it is evaluated (attacks' gradients and scoring): bf16 runs
    # them under autocast, 1.77x faster on 2 AMX CPU cores (bench.precision); an attack in bf16 must be no weaker than
    # in fp32 on the same defense (checked: docs/STUDY.md), so it is opt-in and said in every report
    eval_precision: Precision = Precision.FP32
    # the gradient-masking audit (at light and full) on the first `audit_images` evaluated images
    # (0: all): its flags are about the defense, and a few hundred images decide them at a fraction
    # of the cost (its Square alone is `queries` x EOT forwards per image)
    audit_images: int = 0
    # speed switches (each checked against fp32 NCHW in bench/)
    precision: Precision = Precision.FP32
    channels_last: bool = False
    compile: bool = False  # torch.compile the purifier, discriminator and classifier

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Config:
        """Build a checked config; unknown keys and out-of-range values raise `ConfigError`."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"accepted keys: {', '.join(sorted(known))}"
            )
        hints = typing.get_type_hints(cls)
        converted = {name: _convert(name, value, hints[name]) for name, value in values.items()}
        cfg = cls(**converted)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> Config:
        """Load a JSON or YAML config file (see `read_config_file`), then apply overrides."""
        return cls.from_dict({**read_config_file(path), **overrides})

    def replace(self, **changes: Any) -> Config:
        """A copy with some fields changed, checked like `from_dict`."""
        return Config.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (enums as their strings): what MLflow and checkpoints store."""
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in dataclasses.asdict(self).items()}

    @property
    def unseen_attack_names(self) -> list[str]:
        return [name.strip() for name in self.unseen_attacks.split(",") if name.strip()]

    @property
    def step_size(self) -> float:
        """The training attack's step size after resolving the 0 = default rule."""
        if self.train_step_size > 0:
            return self.train_step_size
        if self.train_attack is TrainAttack.FGSM:
            return self.train_eps
        return pgd_step_size(self.train_eps, self.train_steps)

    def validate(self) -> None:
        """Check ranges and names; raise `ConfigError` on the first bad value."""
        _in_range("n_train", self.n_train, 0, None)
        _in_range("n_eval", self.n_eval, 1, None)
        _in_range("audit_images", self.audit_images, 0, None)
        _in_range("purifier_width", self.purifier_width, 4, 512)
        _in_range("mask_ratio", self.mask_ratio, 0.0, 0.95)
        _in_range("block_size", self.block_size, 1, 64)
        _in_range("noise_std", self.noise_std, 0.0, 1.0)
        _in_range("num_masks", self.num_masks, 2, 64)
        _in_range("train_eps", self.train_eps, 0.0, 16.0)
        _in_range("train_steps", self.train_steps, 1, 1000)
        _in_range("train_step_size", self.train_step_size, 0.0, 16.0)
        _in_range("train_eot", self.train_eot, 1, 256)
        _in_range("lambda_ce", self.lambda_ce, 0.0, 100.0)
        _in_range("gan_weight", self.gan_weight, 0.0, 100.0)
        _in_range("l1_weight", self.l1_weight, 0.0, 1000.0)
        _in_range("ce_warmup_epochs", self.ce_warmup_epochs, 0, 10_000)
        _in_range("lr", self.lr, 1e-8, 1.0)
        _in_range("beta1", self.beta1, 0.0, 0.9999)
        _in_range("beta2", self.beta2, 0.0, 0.99999)
        _in_range("epochs", self.epochs, 0, 100_000)  # 0: no fine-tuning, the pre-trained defense evaluated
        _in_range("batch_size", self.batch_size, 1, 65_536)
        _in_range("eval_eps_linf", self.eval_eps_linf, 0.0, 1.0)
        _in_range("eval_eps_l2", self.eval_eps_l2, 0.0, 100.0)
        if self.defense is DefenseKind.CLASSIFIER and self.epochs != 0:
            raise ConfigError(f"epochs={self.epochs} with defense='classifier' (the classifier alone has nothing "
                              "to fine-tune); accepted: epochs=0, or defense='full'")
        if self.train_norm is Norm.LINF and self.train_eps > 1.0:
            raise ConfigError(f"train_eps={self.train_eps} is above 1 for linf on [0,1] images; accepted: 0..1")
        # the registries' names, not the registries (which hold torch classes): refusing costs no torch import
        _one_of("dataset", self.dataset, names.DATASETS)
        _one_of("classifier", self.classifier, names.CLASSIFIERS)
        _one_of("purifier", self.purifier, names.PURIFIERS)
        for name in self.unseen_attack_names:
            _one_of("unseen_attacks entry", name, names.ATTACKS)
        if not self.unseen_attack_names:
            raise ConfigError(f"unseen_attacks={self.unseen_attacks!r} names no attack; "
                              f"accepted: {', '.join(sorted(names.ATTACKS))}")


def read_yaml_or_json(path: str | Path, label: str, accepted: str) -> Any:
    """The data in a `.json`, `.yaml` or `.yml` file (YAML through `yaml.safe_load`: no tags; JSON is
    YAML too, so one safe parser reads both); None for an empty file.

    Args:
        path: the file.
        label: how errors name the file, e.g. "config file 'x.yaml'" or "--enqueue 'refs.yaml'".
        accepted: what the file should hold, for errors, e.g. "a mapping of key: value".

    Raises:
        ConfigError: one line, for a wrong suffix, a file that cannot be read (a folder, say),
            text that is not UTF-8, or text that does not parse.
    """
    path = Path(path)
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"{label} must end in .json, .yaml or .yml")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{label} cannot be read ({exc.strerror}); accepted: {accepted} in YAML or JSON") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label} is not UTF-8 text; accepted: {accepted} in YAML or JSON") from None
    import yaml  # only here: most importers never read a file

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{label} does not parse: {' '.join(str(exc).split())[:200]}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a config file (`read_yaml_or_json`); an empty file sets nothing."""
    label = f"config file {str(path)!r}"
    data = read_yaml_or_json(path, label, "a mapping of key: value")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label} must hold a mapping of key: value")
    return data


def _in_range(name: str, value: float, low: float, high: float | None) -> None:
    if value < low or (high is not None and value > high):
        accepted = f">= {low}" if high is None else f"{low}..{high}"
        raise ConfigError(f"{name}={value!r} is out of range; accepted: {accepted}")


def _one_of(name: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is unknown; accepted: {', '.join(choices)}")


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def _convert(name: str, value: Any, hint: Any) -> Any:
    """Convert one raw value (often a string from a CLI, YAML or MLflow params) to the field type."""
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value.value if isinstance(value, enum.Enum) else str(value).lower())
        except ValueError:
            accepted = ", ".join(m.value for m in hint)
            raise ConfigError(f"{name}={value!r} is unknown; accepted: {accepted}") from None
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise ConfigError(f"{name}={value!r} is not a boolean; accepted: true, false")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not a number; accepted: a {hint.__name__}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not a number; accepted: a {hint.__name__}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}={value!r} is not a number; accepted: a finite {hint.__name__}")
        if hint is int:
            if number != int(number):
                raise ConfigError(f"{name}={value!r} is not an integer; accepted: an int")
            return int(number)
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r} is not a string")
        return value
    raise TypeError(f"no converter for field {name} of type {hint}")
