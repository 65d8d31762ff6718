"""Test-only fault injection into a running trial (`ATOP_FAULT_INJECT`); unset, it does nothing.

The reliability tests cause real faults through it without mocking Ray, MLflow or Optuna. The
variable holds `;`-separated specs `KIND@trial=N[,stage=S][,epoch=E][,once=FILE][,seconds=S]`, each
acting on Optuna trial N (`*`: every trial; a confirm trial has its search trial's number) of stage
S (`search` or `confirm`; default both) when it has finished E epochs (E=0: before the first epoch;
default 1):

- `raise`: raise `RuntimeError` (Tune retries it from the last checkpoint, then FAIL);
- `transient`: the same, but only the first time (needs `once=FILE`, created when it fires;
  `once` makes any kind fire only once, across the attempts of a trial; `{trial}` in FILE becomes
  the trial number);
- `nan`: fill the purifier's weights with NaN, so the next epoch's loss is really non-finite;
- `sleep`: sleep S seconds (keeps a trial running while a test kills something).

The driver forwards the variable to cluster workers in the job's runtime env (`study/run.py`).
docs/RELIABILITY.md says which test uses which kind.
"""
from __future__ import annotations

import os
import time
from typing import Final

import torch

FAULT_ENV: Final = "ATOP_FAULT_INJECT"


class FaultPlan:
    """The fault specs of one trial, read from `FAULT_ENV`."""

    KINDS = ("raise", "transient", "nan", "sleep")

    def __init__(self, specs: list[dict[str, str]]):
        self.specs = specs

    @classmethod
    def from_env(cls, number: int, stage: str = "search") -> FaultPlan:
        """The specs of `FAULT_ENV` that act on trial `number` of `stage`; a bad spec raises `ValueError`."""
        text = os.environ.get(FAULT_ENV, "").strip()
        specs = []
        for item in filter(None, (p.strip() for p in text.split(";"))):
            kind, _, args = item.partition("@")
            spec = dict(kv.split("=", 1) for kv in args.split(",") if "=" in kv)
            if kind not in cls.KINDS or "trial" not in spec:
                raise ValueError(f"{FAULT_ENV}={text!r}: bad spec {item!r}; accepted: "
                                 f"{'|'.join(cls.KINDS)}@trial=N[,stage=S][,epoch=E][,once=FILE][,seconds=S]")
            if spec["trial"] in ("*", str(number)) and spec.get("stage", stage) == stage:
                if "once" in spec:
                    spec["once"] = spec["once"].replace("{trial}", str(number))
                specs.append({"kind": kind, **spec})
        return cls(specs)

    def at(self, epoch: int, purifier: torch.nn.Module) -> None:
        """Fire the specs of `epoch` (call after each epoch, and with the start epoch before any)."""
        for spec in self.specs:
            if int(spec.get("epoch", 1)) != epoch:
                continue
            kind = spec["kind"]
            if "once" in spec or kind == "transient":  # fire only the first time, across attempts
                try:
                    os.close(os.open(spec["once"], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    continue
            if kind == "sleep":
                time.sleep(float(spec.get("seconds", 10)))
            elif kind == "nan":
                with torch.no_grad():
                    for p in purifier.parameters():
                        p.fill_(float("nan"))
            elif kind == "raise":
                raise RuntimeError(f"injected fault ({FAULT_ENV}) after epoch {epoch}")
            elif kind == "transient":
                raise RuntimeError(f"injected transient fault ({FAULT_ENV}) after epoch {epoch}")
