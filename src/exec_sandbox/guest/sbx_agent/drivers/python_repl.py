"""Python REPL driver of the guest agent (run with ``python3 -u -c <this source>``; stdlib only).

Protocol: the agent writes blocks to the fd named by ``SBX_REPL_IN`` as ``[b"r"]<length>\\n<code>``
(``r``: reseed ``random`` and reset ``tempfile``'s name generator first, asked after a snapshot
restore); the driver runs each block in one persistent namespace and writes ``<exit code>\\n`` to
the fd named by ``SBX_REPL_OUT`` once its output is flushed. EOF on the input ends the driver.

User code runs in a module of its own registered as ``sys.modules["__main__"]`` (as a script's
does), so what it defines pickles by reference (``multiprocessing``, ``ProcessPoolExecutor``).
A process forked by user code that gets back here (its code raised, called ``sys.exit`` or simply
ended) exits with the block's exit code, like a forked script at its end: only the driver's own
process reports a status or reads the next block.
"""

import os
import sys


def _sbx_main() -> None:
    import linecache
    import traceback

    fin = int(os.environ.pop("SBX_REPL_IN"))
    fout = int(os.environ.pop("SBX_REPL_OUT"))
    me = os.getpid()
    main = type(sys)("__main__")  # a fresh module: the driver's own names stay out of user code's
    main.__builtins__ = __builtins__  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    g = main.__dict__
    n = 0

    def readn(k: int) -> bytes:
        parts = []
        while k:
            b = os.read(fin, min(k, 1 << 20))
            if not b:
                os._exit(0)
            parts.append(b)
            k -= len(b)
        return b"".join(parts)

    while True:
        line = b""
        while not line.endswith(b"\n"):
            b = os.read(fin, 1)
            if not b:
                os._exit(0)
            line += b
        if line[:1] == b"r":
            # Reseed before this block (the agent asks after a snapshot restore): no compile, no
            # extra round trip, and the user's line numbers stay as written.
            line = line[1:]
            m = sys.modules
            if "random" in m:
                m["random"].seed()
            if "tempfile" in m:
                m["tempfile"]._name_sequence = None  # type: ignore[attr-defined]
        code = readn(int(line)).decode("utf-8", "replace")
        n += 1
        name = f"<session-{n}>"
        linecache.cache[name] = (len(code), None, code.splitlines(True), name)
        rc = 0
        try:
            exec(compile(code, name, "exec"), g)
        except SystemExit as e:
            c = e.code
            if c is None:
                rc = 0
            elif isinstance(c, int):
                rc = c & 0xFF
            else:
                print(c, file=sys.stderr)
                rc = 1
        except BaseException as e:
            tb = e.__traceback__.tb_next if e.__traceback__ is not None else None
            traceback.print_exception(type(e), e, tb)
            rc = 1
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        if os.getpid() != me:  # a child forked by the block: it ends here, as a script's would
            os._exit(rc)
        os.write(fout, b"%d\n" % rc)


_sbx_main()
