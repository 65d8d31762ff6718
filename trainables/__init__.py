"""Ray Tune trainables: thin adapters from a Tune config to an `atop` fine-tuning run.

`atop_trainable.train_atop` is the one module here that imports `ray.tune`; MLflow traffic goes
through `tracking.mlflow_log`, the names it shares with the driver are in `tracking.contract`.
What a trial needs besides: `worker` (its reused worker process: pre-trained weights cached,
freed heap returned, its device), `trial_state` (its checkpoint files) and `faults` (test-only
fault injection).
"""
