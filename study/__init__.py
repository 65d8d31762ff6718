"""The study: `python study/run.py` (or `ray job submit ... -- python study/run.py`). See docs/STUDY.md."""
