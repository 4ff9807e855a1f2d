"""User errors: a case's bad input, named with its case and file, and how to find one in an exception chain.

Kept free of torch and MONAI, so the command line parses its arguments and prints its help without loading them.
"""

from __future__ import annotations

import os

from crossmodal.config import ConfigError


class CaseError(ValueError):
    """Bad input for one case: names the case, the file and what is wrong."""

    def __init__(self, case_id: str, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.case_id, self.path, self.problem = case_id, str(path) if path else None, problem
        where = f" file {self.path}:" if self.path else ""
        super().__init__(f"case {case_id!r}:{where} {problem}")

    def __reduce__(self) -> tuple[type[CaseError], tuple[str, str | None, str]]:
        """Pickled with its three arguments (a loader's worker process sends it back; ``args`` holds the message)."""
        return type(self), (self.case_id, self.path, self.problem)


class TrainingDiverged(ConfigError):
    """A training run's loss or weights stopped being finite (NaN / Inf): the run stops before publishing them.

    A ``ConfigError``: the usual cause is a learning rate too large for the network (the message says which)."""


def cause_of_type(e: BaseException | None, types: tuple[type[BaseException], ...]) -> BaseException | None:
    """``e`` or the first of its causes (``raise ... from``, else the exception being handled) that is one of
    ``types``; None when the chain holds none.

    MONAI's transforms and ignite's engine wrap what a loader raised (``RuntimeError: applying transform ...``),
    so the :class:`CaseError` that names the case and the file lies further down the chain.

    Example:
        >>> try:
        ...     try:
        ...         raise CaseError("brain003", None, "is empty")
        ...     except CaseError as inner:
        ...         raise RuntimeError("applying transform") from inner
        ... except RuntimeError as outer:
        ...     print(cause_of_type(outer, (CaseError,)), cause_of_type(outer, (KeyError,)))
        case 'brain003': is empty None
    """
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, types):
            return e
        e = e.__cause__ or e.__context__
    return None


def user_error_in(e: BaseException) -> BaseException | None:
    """The :class:`CaseError` or ``ConfigError`` in ``e``'s chain - what to show the user -, or None (a bug)."""
    return cause_of_type(e, (CaseError, ConfigError))
