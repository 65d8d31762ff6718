"""The one exception the analysis raises for bad input."""


class AnalysisError(ValueError):
    """Bad input to the analysis: its message is one line naming the bad value and what is accepted.

    The CLI prints it as ``error: <message>`` and exits with status 2.
    """
