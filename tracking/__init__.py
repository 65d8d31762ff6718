"""The study's tracking layer: the trial contract (`tracking.contract`) and MLflow I/O.

`tracking.contract` is pure Python (what analysis imports); `tracking.mlflow_log` holds every MLflow
call a study makes (runs, buffered logging with a spool for outages). Replay a spool with

    python -m tracking upload SPOOL.jsonl [...] --mlflow-uri URI
"""
