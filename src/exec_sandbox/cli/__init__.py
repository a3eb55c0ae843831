"""The ``sbx`` command line (console script ``sbx = exec_sandbox.cli:main``).

Modules, imports pointing down only: :mod:`.progress` (rich rendering of image builds) ←
:mod:`.run` (``sbx run``) ← :mod:`.app` (the click group ``main`` and ``sbx images``).
Library errors become exit codes and one stderr line in one place per command
(:func:`exec_sandbox.cli.run.format_error`, ``exit_code_for_error``).
"""

from __future__ import annotations

from exec_sandbox.cli.app import main

__all__ = ["main"]
