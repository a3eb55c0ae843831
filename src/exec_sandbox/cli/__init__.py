"""The ``sbx`` command line (console script ``sbx = exec_sandbox.cli:main``).

Modules, imports pointing down only: :mod:`.errors` (library errors -> exit codes and one stderr
line: the CLI's one error boundary), :mod:`.args` (``sbx run`` arguments, pure) and :mod:`.progress`
(rich rendering of image builds) <- :mod:`.run` (``sbx run``) <- :mod:`.app` (the click group
``main`` and ``sbx images``).
"""

from __future__ import annotations

from exec_sandbox.cli.app import main

__all__ = ["main"]
