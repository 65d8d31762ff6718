"""`python -m tracking upload SPOOL.jsonl [...] --mlflow-uri URI`: replay spooled MLflow calls."""
import sys

from tracking.mlflow_log import main

sys.exit(main())
