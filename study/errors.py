"""`StudyError`: bad study input, refused in one line (its own module: every light study module raises it)."""
from __future__ import annotations


class StudyError(ValueError):
    """Bad study input; the message is one line naming the value and what is accepted."""
