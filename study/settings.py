"""Study settings: a preset (data files under study/presets/), a config file, then CLI flags.

A preset file names its scale with `atop_preset:` (config + pre-training from `atop.presets`).

A settings file (YAML through `yaml.safe_load`, or JSON) holds study-level keys (`STUDY_KEYS`),
`pretrain:` (fields of `atop.presets.PretrainSettings`) and `config:` (fields of
`atop.config.Config`, the settings every trial shares; a search space suggests the rest). Paths
(data dir, storage path, MLflow URI) come only from the command line, never from a file, so no file
can point a study outside its folder. Unknown keys and bad values raise `StudyError`, one line.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from atop.config import Config, ConfigError, read_config_file
from atop.presets import PretrainSettings, get_preset
from search_spaces import SPACES, Space, searched_names
from study.args import NAME_RE
from study.confirm import CONFIRM_KEYS
from study.errors import StudyError

if TYPE_CHECKING:
    import optuna

PRESET_DIR = Path(__file__).resolve().parent / "presets"

def _tpe(samplers: ModuleType, seed: int) -> optuna.samplers.TPESampler:
    """Multivariate TPE (grouped: the RT parameters are conditional) with the constant liar, so trials
    asked while others run are not proposed at the same point. The default: the only sampler above
    random search within 64 trials on `bench/samplers.py`'s table (docs/PERFORMANCE.md)."""
    from optuna.exceptions import ExperimentalWarning  # a sampler is being built: Optuna is loaded

    with warnings.catch_warnings():  # `group` is marked experimental; say nothing to every study
        warnings.simplefilter("ignore", ExperimentalWarning)
        return samplers.TPESampler(multivariate=True, group=True, constant_liar=True, seed=seed)


#: sampler name -> factory(the module `optuna.samplers`, seed, population_size); `--sampler NAME` picks
#: one. The module is passed in so that checking a name (this module's import) costs no Optuna import.
SAMPLERS: dict[str, Callable[[ModuleType, int, int], optuna.samplers.BaseSampler]] = {
    "nsga2": lambda samplers, seed, population_size: samplers.NSGAIISampler(population_size=population_size,
                                                                            seed=seed),
    "tpe": lambda samplers, seed, _: _tpe(samplers, seed),  # the default
    "gp": lambda samplers, seed, _: samplers.GPSampler(seed=seed, warn_independent_sampling=False),
    "random": lambda samplers, seed, _: samplers.RandomSampler(seed=seed),
}
SCHEDULERS = ("none", "mo-asha")  # early stopping of trials (study/scheduler.py)


@dataclass
class StudySettings:
    space: str = "paper"
    sampler: str = "tpe"
    population_size: int = 50  # NSGA-II generation size
    num_trials: int = 4
    max_concurrent: int = 2
    cpus: float = 1.0  # per trial (fractions allowed)
    gpus: float = 0.0  # per trial (fractions allowed)
    max_failures: int = 1  # Tune retries of a trial that raised, from its last checkpoint
    scheduler: str = "none"  # "mo-asha": stop dominated trials at rungs (study/scheduler.py)
    grace_period: int = 1  # mo-asha: first rung, in epochs
    reduction_factor: int = 3  # mo-asha: about 1 in reduction_factor trials passes each rung
    constraints: list[str] = field(default_factory=list)  # `--constraint`s (study/constraints.py)
    time_budget_h: float | None = None  # no new trial starts this many hours after the driver started
    stop_on_plateau: str | None = None  # "K,EPS": stop once K finished trials grew the front by <= EPS
    #: reference configurations run first and always confirmed, as `--enqueue FILE`'s entries (study/enqueue.py)
    references: list[dict[str, Any]] = field(default_factory=list)
    confirm: bool = True  # after the search, confirm its front on test images (study/confirm.py)
    confirm_top: int = 3  # Pareto-optimal configurations to confirm (spread over the front)
    confirm_seeds: int = 2  # new fine-tuning seeds per confirmed configuration
    #: how confirm trials are scored (`study.confirm.CONFIRM_KEYS`): level and test images
    confirm_config: dict[str, Any] = field(default_factory=lambda: {"eval_level": "full"})
    pretrain: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def validate(self, *, full: bool = True) -> None:
        """A one-line `StudyError` for the first bad setting. `full=False`: only the checks that import
        no Optuna (names, ranges, pretrain, config and constraint values); the rest run the search space."""
        _one_of("--space", self.space, SPACES)
        _one_of("--sampler", self.sampler, SAMPLERS)
        _one_of("--scheduler", self.scheduler, SCHEDULERS)
        for name, low in (("num_trials", 1), ("max_concurrent", 1), ("population_size", 2), ("max_failures", 0),
                          ("grace_period", 1), ("reduction_factor", 2), ("confirm_top", 1), ("confirm_seeds", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                more = " (or --no-confirm)" if name.startswith("confirm") else ""
                raise StudyError(f"--{name.replace('_', '-')} {value!r} is out of range; "
                                 f"accepted: an integer >= {low}{more}")
        if not isinstance(self.confirm, bool):
            raise StudyError(f"confirm {self.confirm!r} is not a boolean; accepted: true or false")
        if not self.cpus > 0:
            raise StudyError(f"--cpus {self.cpus!r} is out of range; accepted: a number > 0")
        if not self.gpus >= 0:
            raise StudyError(f"--gpus {self.gpus!r} is out of range; accepted: a number >= 0")
        # the checks that import no Optuna first: the space's run (in `base_config`) and study.stopping do
        self.pretrain_settings()
        self.parsed_constraints()
        self.confirm_base(run_space=False)
        if not full:
            return
        self.confirm_base()
        self.search_stop(started=0.0)
        if self.scheduler == "mo-asha":
            self._check_grace_period()

    def _check_grace_period(self) -> None:
        """MO-ASHA's first rung must come after the CE warm-up (before it lambda_ce has had no effect:
        a rung there ranks purifiers on L_gen alone) and before the last epoch."""
        base = self.base_config()
        first = longest_ce_warmup(SPACES[self.space], base) + 1  # reported epochs count from 1
        accepted = (f"an integer from {first} to {base.epochs - 1}" if first < base.epochs else
                    f"none with {base.epochs} epochs and {first - 1} CE warm-up epochs (raise --epochs)")
        if self.grace_period < first:
            raise StudyError(f"--grace-period {self.grace_period} is at or inside the CE warm-up ({first - 1} "
                             f"epoch(s), lambda_ce has had no effect yet); accepted with --scheduler mo-asha: "
                             f"{accepted}")
        if self.grace_period >= base.epochs:
            raise StudyError(f"--grace-period {self.grace_period} leaves no rung before the last epoch "
                             f"({base.epochs}); accepted with --scheduler mo-asha: {accepted}")

    def pretrain_settings(self) -> PretrainSettings:
        known = {f.name for f in dataclasses.fields(PretrainSettings)}
        unknown = sorted(set(self.pretrain) - known)
        if unknown:
            raise StudyError(f"unknown pretrain key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(sorted(known))}")
        try:
            return PretrainSettings(**self.pretrain)
        except (ConfigError, TypeError) as exc:
            raise StudyError(f"pretrain: {exc}") from None

    def base_config(self, *, run_space: bool = True) -> Config:
        """The config every trial starts from: Config defaults, the space's fixed values, `config`.
        `run_space=False`: without the check that `config` sets no searched key (it runs the space)."""
        space = SPACES[self.space]
        try:  # first: a bad value is refused without running the space (which imports Optuna)
            base = Config.from_dict({**space.fixed, **self.config})
        except ConfigError as exc:
            raise StudyError(str(exc)) from None
        if not run_space:
            return base
        clash = sorted(set(self.config) & searched_names(space))
        if clash:
            raise StudyError(f"config key(s) {', '.join(clash)} are searched by space {self.space!r}; "
                             "remove them or choose another space")
        return base

    def search_stop(self, started: float) -> Any:
        """`study.stopping.SearchStop` of `time_budget_h` and `stop_on_plateau` counted from
        `started` (None: neither set; a bad one: `StudyError`)."""
        from study.stopping import SearchStop, check_time_budget

        check_time_budget(self.time_budget_h)
        return SearchStop.of(self.time_budget_h, self.stop_on_plateau, started)

    def parsed_constraints(self) -> tuple[Any, ...]:
        """`constraints` as `study.constraints.Constraint`s (a bad one: `StudyError`)."""
        from study.constraints import parse

        if not isinstance(self.constraints, list):
            raise StudyError(f"constraints {self.constraints!r} is not a list; accepted: a list of OBJECTIVE>=NUMBER")
        return parse(self.constraints)

    def confirm_base(self, *, run_space: bool = True) -> Config:
        """The config of confirm trials before a trial's params: `base_config()` with `confirm_config`."""
        unknown = sorted(set(self.confirm_config) - set(CONFIRM_KEYS))
        if unknown:
            raise StudyError(f"confirm_config key(s) {', '.join(map(repr, unknown))} are not accepted; "
                             f"accepted: {', '.join(CONFIRM_KEYS)} (confirm trials train as their search trial did)")
        try:
            return Config.from_dict({**self.base_config(run_space=run_space).to_dict(), **self.confirm_config})
        except ConfigError as exc:
            raise StudyError(f"confirm_config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_sampler(name: str, seed: int, population_size: int, n_existing: int) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `name` (a key of `SAMPLERS`), seeded past the draws already made.

    Args:
        name: sampler name; an unknown one raises `StudyError` listing the accepted names.
        seed: the study's seed.
        population_size: NSGA-II generation size (ignored by the others).
        n_existing: trials the study already has (a resumed random stream must not repeat them).
    """
    _one_of("--sampler", name, SAMPLERS)
    import optuna.samplers  # here, not at the top: see SAMPLERS

    return SAMPLERS[name](optuna.samplers, seed + n_existing, population_size)


def longest_ce_warmup(space: Space, base: Config) -> int:
    """The most CE warm-up epochs a trial of `space` can get: `base`'s, or the top of a searched range.

    A searched `ce_warmup_epochs` is read from the distribution a probe trial meets (in-memory
    study, nothing written); a space that suggested it only under some categorical choice would
    need a probe per branch (`search_spaces.searched_names`), and none does.
    """
    if "ce_warmup_epochs" not in searched_names(space):
        return base.ce_warmup_epochs
    import optuna  # here, not at the top: only mo-asha's check runs a space on a trial

    probe = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    space.suggest(probe)
    dist = probe.distributions["ce_warmup_epochs"]
    assert isinstance(dist, optuna.distributions.IntDistribution), dist  # an epoch count
    return dist.high


def _one_of(flag: str, value: str, accepted: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in accepted:
        raise StudyError(f"{flag} {value!r} is unknown; accepted: {', '.join(sorted(accepted))}")


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def read_file(path: str | Path) -> dict[str, Any]:
    """A settings file as a dict (`atop.config.read_config_file`: YAML via safe_load, or JSON)."""
    try:
        return read_config_file(path)
    except ConfigError as exc:
        raise StudyError(str(exc).replace("config file", "settings file")) from None


def merge(base: StudySettings, data: dict[str, Any], source: str) -> StudySettings:
    """`data` (from a file or flags) over `base`; `pretrain`/`config` merge key by key."""
    known = {f.name for f in dataclasses.fields(StudySettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StudyError(f"unknown key(s) {', '.join(map(repr, unknown))} in {source}; accepted: {', '.join(sorted(known))}")
    values = base.to_dict()
    for key, value in data.items():
        if key in ("pretrain", "config", "confirm_config"):
            if not isinstance(value, dict):
                raise StudyError(f"{key} in {source} must be a mapping of key: value")
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return StudySettings(**values)


def load_preset(name: str) -> StudySettings:
    path = PRESET_DIR / f"{name}.yaml"
    if not NAME_RE.match(name) or not path.is_file():
        raise StudyError(f"--preset {name!r} is unknown; accepted: {', '.join(presets())}")
    data = read_file(path)
    base = StudySettings()
    if "atop_preset" in data:  # the run's scale (config + pre-training) lives in atop.presets
        try:
            scale = get_preset(str(data.pop("atop_preset")))
        except ConfigError as exc:
            raise StudyError(f"preset {name!r}: {exc}") from None
        base = StudySettings(pretrain=dataclasses.asdict(scale.pretrain), config=dict(scale.config))
    return merge(base, data, f"preset {name!r}")
