"""The trial contract: every name the driver, the trainable, MLflow and analysis must agree on.

One definition, imported everywhere (source and tests): the objectives and their directions, the
MLflow tag and metric names of a study, the reserved keys of a trial's Tune config and result, the
Optuna user attributes the driver writes, and the one-line description of an evaluation level.
Changing a value here changes what is stored: Optuna storages and MLflow stores written by earlier
versions must still resume and load, so these strings are frozen (`tests/test_study_contract.py`).

Pure Python: no Ray, torch, Optuna or MLflow, so `analysis/` can import it cheaply.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final


class Direction(str, enum.Enum):
    """Optimisation direction, spelled as Optuna spells it."""

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


@dataclass(frozen=True)
class ObjectiveDef:
    """One objective every trial reports: a fraction in [0, 1] under `name`."""

    name: str
    direction: Direction
    doc: str


#: the study's objectives, in the order of Optuna's value vector
OBJECTIVE_DEFS: Final[tuple[ObjectiveDef, ...]] = (
    ObjectiveDef("clean_acc", Direction.MAXIMIZE, "accuracy on clean test images through the defense"),
    ObjectiveDef("robust_acc_seen", Direction.MAXIMIZE, "accuracy under the training attack's family"),
    ObjectiveDef("robust_acc_unseen", Direction.MAXIMIZE, "worst case per image over the unseen suite"),
)
OBJECTIVES: Final[tuple[str, ...]] = tuple(o.name for o in OBJECTIVE_DEFS)
DIRECTIONS: Final[tuple[str, ...]] = tuple(o.direction.value for o in OBJECTIVE_DEFS)
#: each attack's own accuracy is logged as `robust_acc/<attack registry name>`
ATTACK_FIGURE_PREFIX: Final = "robust_acc/"
#: the figure tables call "AutoAttack-rand": the ensemble `atop.evaluate` adds at `light` and `full`
#: (its attack name is checked against `atop.evaluate.LEVEL_ATTACKS` by tests/test_study_contract.py)
AUTOATTACK_FIGURE: Final = ATTACK_FIGURE_PREFIX + "autoattack_rand_linf"


class Role(str, enum.Enum):
    """Value of `ROLE_TAG`: what one MLflow run of a study is.

    `study`: the parent run. `trial`: one search trial (scored on validation images). `confirm`: one
    confirmed configuration, its test figures aggregated over seeds. `confirm_seed`: one seed of a
    confirmed configuration, fine-tuned again and scored on test images (a child of its `confirm` run).
    """

    STUDY = "study"
    TRIAL = "trial"
    CONFIRM = "confirm"
    CONFIRM_SEED = "confirm_seed"


class Stage(str, enum.Enum):
    """Value of `STAGE_TAG`: the search (validation images) or the confirm stage (test images)."""

    SEARCH = "search"
    CONFIRM = "confirm"


class EvalSplit(str, enum.Enum):
    """Value of `EVAL_SPLIT_TAG`: which images a run's figures come from."""

    VAL = "val"  # carved from the train split (`atop.data.carve_validation`); never trained on
    TEST = "test"


class Arm(str, enum.Enum):
    """Value of `REFERENCE_TAG` on the `reproduce` study's named reference configurations (its arms,
    `search_spaces/reproduce.py`), which `analysis/claims.py` compares to test the paper's claims."""

    CLASSIFIER_ALONE = "classifier-alone"  # no RT, no purifier
    RT1_NO_FT = "rt1-no-ft"  # RT + the pre-trained purifier, not fine-tuned
    RT2_NO_FT = "rt2-no-ft"
    RT3_NO_FT = "rt3-no-ft"
    RT2_FT_LAMBDA0 = "rt2-ft-lambda0"  # fine-tuned with the CE term off: the control
    RT2_ATOP_FGSM = "rt2-atop-fgsm"  # AToP with the authors' training attack (FGSM, classifier)
    RT2_ATOP_PGD_EOT = "rt2-atop-pgd-eot"  # AToP with PGD-EOT through the whole defense


# --- MLflow tags ------------------------------------------------------------------------------
ROLE_TAG: Final = "atop.role"
TRIAL_TAG: Final = "optuna.trial_number"
PARENT_TAG: Final = "mlflow.parentRunId"
SPACE_TAG: Final = "atop.space"
STUDY_TAG: Final = "atop.study"
PRETRAINED_TAG: Final = "atop.pretrained"
RESOURCES_TAG: Final = "atop.resources"
#: on every trial run: the Ray node (its id, then its IP) the trial last started or restarted on
NODE_TAG: Final = "atop.node"
RESTORED_TAG: Final = "atop.restored_from_epoch"
#: on the rerun of an interrupted trial that started from its checkpoint: that checkpoint (`RESUME_FROM`)
RESUMED_FROM_TAG: Final = "atop.resumed_from"
STOPPED_TAG: Final = "atop.stopped"
INTERRUPTED_TAG: Final = "atop.interrupted"
ERROR_TAG: Final = "atop.error"
LAST_ERROR_TAG: Final = "atop.last_error"
OPTUNA_STATE_TAG: Final = "optuna.state"
#: `screen` or `full` (`atop.config.EvalLevel`): how strong the attacks behind a run's figures were
EVAL_LEVEL_TAG: Final = "atop.eval_level"
STAGE_TAG: Final = "atop.stage"
EVAL_SPLIT_TAG: Final = "atop.eval_split"
#: on every trial run: how its figures were obtained, in one line (`atop.evaluate.describe`: level,
#: attacks' steps, EOT, queries, scoring draws, precision, image count and split; then the eps)
EVALUATION_TAG: Final = "atop.evaluation"
#: on `confirm` and `confirm_seed` runs: the search trial's number and MLflow run id they confirm
CONFIRM_OF_TAG: Final = "atop.confirm_of"
CONFIRM_OF_RUN_TAG: Final = "atop.confirm_of_run"
#: on `confirm_seed` runs: the fine-tuning seed
CONFIRM_SEED_TAG: Final = "atop.confirm_seed"
#: on trials enqueued from `--enqueue FILE` and their confirm runs: the reference config's name
REFERENCE_TAG: Final = "atop.reference"
#: on `confirm` runs: the gradient-masking audit's verdict over its seeds ("no flags", "flags: a, b",
#: or "not audited")
AUDIT_TAG: Final = "atop.audit"
#: on a trial that broke a `--constraint`: the bounds it broke (kept, never on the front)
INFEASIBLE_TAG: Final = "atop.infeasible"
#: on the study's parent run: why this driver's search stopped before `--num-trials` (`study.stopping`)
SEARCH_STOPPED_TAG: Final = "atop.search_stopped"
#: MLflow run statuses that end a run
TERMINAL_STATUSES: Final = ("FINISHED", "FAILED", "KILLED")


def role_filter(role: Role) -> str:
    """MLflow `search_runs` filter string for a study's runs of one role, e.g. every search trial."""
    return f"tags.`{ROLE_TAG}` = '{role.value}'"

# --- metric names besides the objectives -----------------------------------------------------
EPOCH: Final = "epoch"
COMPUTE_S: Final = "compute_s"
IMAGES_PER_S: Final = "images_per_s"
DRIVER_WALL_S: Final = "driver_wall_s"
#: the parent run's trial counts: `trials_complete`, `trials_pruned`, `trials_fail`
TRIAL_COUNT_METRIC: Final = "trials_{state}"
#: on the study's parent run: fANOVA importance of a searched parameter for an objective (`study.importance`)
IMPORTANCE_METRIC: Final = "importance/{objective}/{param}"
#: on the study's parent run: the COMPLETE trials the importances were fitted to
IMPORTANCE_TRIALS_METRIC: Final = "importance/n_trials"


def importance_order(found: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The parameters of `found` (objective -> parameter -> importance), most important first summed over
    the objectives: the row order of the importance tables (the driver's output and analysis' report)."""
    return sorted({p for by_param in found.values() for p in by_param},
                  key=lambda p: -sum(by_param.get(p, 0.0) for by_param in found.values()))
PARETO_ARTIFACT: Final = "pareto.txt"
#: confirm stage metrics. A `confirm_seed` run logs its figures as `test/<figure>` (with `_lo`/`_hi`,
#: Wilson over test images). A `confirm` run logs, for each objective: `test/<objective>` (mean over
#: seeds), `test/<objective>_sd` (standard deviation over seeds), `test/<objective>_lo`/`_hi` (95%
#: bootstrap interval over test images of the per-image mean over seeds and draws),
#: `val/<objective>` (+ `_lo`/`_hi`: the search trial's validation figure) and `gap/<objective>`
#: (validation minus test); and `test/n_seeds`, `test/n_images`.
TEST_PREFIX: Final = "test/"
VAL_PREFIX: Final = "val/"
GAP_PREFIX: Final = "gap/"
CONFIRM_ARTIFACT: Final = "confirm.txt"

# --- keys the driver and the trainable exchange through Tune ---------------------------------
#: reserved keys of a trial's Tune config besides the `atop.config.Config` fields
TRIAL_NUMBER: Final = "optuna_trial_number"
RUN_ID: Final = "mlflow_run_id"
#: a rerun of an interrupted trial: its checkpoint (`CHECKPOINT_FILES`), relative to the study folder
RESUME_FROM: Final = "atop_resume_from"
#: how the driver's lines name a search trial: its reference's name (`--enqueue`) and the values it searched
TRIAL_LABEL: Final = "atop_trial_label"
TRIAL_KEYS: Final = (TRIAL_NUMBER, RUN_ID, RESUME_FROM, TRIAL_LABEL)
#: the files of a trial's Tune checkpoint (`checkpoint_<k>/` in its trial folder): the defense, the trainer's state
CHECKPOINT_FILES: Final = ("defense.pt", "trainer_state.pt")
#: a result with FAILED_KEY=1 ends a trial that a retry cannot fix; ERROR_KEY says why
FAILED_KEY: Final = "atop_failed"
ERROR_KEY: Final = "atop_error"

# --- Optuna user attributes the driver writes ------------------------------------------------
ATTR_RUN_ID: Final = RUN_ID
ATTR_ERROR: Final = "error"
ATTR_STOPPED_AT: Final = "stopped_at_epoch"
ATTR_INTERRUPTED: Final = "interrupted"
ATTR_RERUN_OF: Final = "rerun_of"
#: on such a rerun: the interrupted trial's last checkpoint it starts from (`RESUME_FROM`)
ATTR_RESUME_FROM: Final = "resume_from"
#: the name of an enqueued reference configuration (`--enqueue FILE`)
ATTR_REFERENCE: Final = "reference"
#: on a trial copied from another study by `--warm-start` (`study.warmstart`): "<study>#<number>";
#: it guides the sampler only (no MLflow run, never counted, never on this study's front)
ATTR_WARM_START: Final = "warm_start_of"
#: objective -> [lo, hi]: the 95% interval of each validation objective (`<objective>_lo`/`_hi`)
ATTR_INTERVALS: Final = "intervals"


@dataclass(frozen=True)
class TrialSummary:
    """What the driver learns from a trial's last result.

    Attributes:
        failed: no usable objectives (the trial raised, reported `FAILED_KEY`, or lacks one).
        error: why it failed ("" when it did not).
        values: the objectives in `OBJECTIVES` order (empty when failed).
        epoch: the last epoch it reported.
        compute_s, images_per_s: its own compute time and training throughput.
        intervals: objective -> (lo, hi), its 95% interval where the result has `_lo`/`_hi`.
    """

    failed: bool
    error: str = ""
    values: tuple[float, ...] = ()
    epoch: int = 0
    compute_s: float | None = None
    images_per_s: float | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, result: dict | None) -> TrialSummary:
        """Summarise a trial's last Tune result (None: it reported nothing)."""
        if not result:
            return cls(failed=True, error="no result reported")
        if result.get(FAILED_KEY):
            return cls(failed=True, error=str(result.get(ERROR_KEY, "failed")))
        missing = [m for m in OBJECTIVES if m not in result]
        if missing:
            return cls(failed=True, error=f"result lacks {', '.join(missing)}")
        return cls(failed=False, values=tuple(float(result[m]) for m in OBJECTIVES),
                   epoch=int(result.get(EPOCH, 0)), compute_s=float(result.get(COMPUTE_S, 0.0)),
                   images_per_s=float(result.get(IMAGES_PER_S, 0.0)),
                   intervals={m: (float(result[f"{m}_lo"]), float(result[f"{m}_hi"])) for m in OBJECTIVES
                              if f"{m}_lo" in result and f"{m}_hi" in result})


def eval_level_note(level: str, budget: dict[str, int], *, precision: str = "fp32", audit_images: int = 0) -> str:
    """One line saying how strong a level's attacks were, e.g. for a table of screening figures.

    Args:
        level: `screen`, `light` or `full` (`atop.config.EvalLevel`).
        budget: the level's budget (`atop.evaluate.LEVELS[level]`: steps, eot, repeats, ...).
        precision, audit_images: the config's `eval_precision` and `audit_images` (0: every image).
    """
    draws = budget.get("repeats", 1)
    text = (f"{level} level: PGD-{budget.get('steps', '?')}, EOT {budget.get('eot', '?')}, "
            f"{draws} draw{'s' if draws != 1 else ''}")
    if precision != "fp32":
        text += f", the defense in {precision}"
    audit = f"audit on the first {audit_images} images" if audit_images else "audit"
    if level == "full":
        return text if not audit_images else f"{text}, {audit}"
    if level == "light":
        return f"{text}, Square {budget.get('queries', '?')} queries, AutoAttack-rand, {audit}; lighter than full"
    return f"{text}; not final"
