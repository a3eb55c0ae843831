"""The guest behaves like a Linux box to user code (issue 11), through the public API on real TCG VMs.

Each test failed on the agent before its fix: a forked child ended the run or took over the
session, user functions did not pickle, JavaScript ran in a bare ``vm`` context, /dev/std* were
missing, user code could gain privileges through exec, and the work area was the image's few MiB.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from exec_sandbox.sandbox.scheduler import Scheduler
from tests.integration.test_scheduler_support import scheduler_for_tests

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler() -> AsyncIterator[Scheduler]:
    async with scheduler_for_tests() as sched:
        yield sched


# --------------------------------------------------------------------------- 1. os.fork()

FORK_CHILD_ENDINGS = {
    "os._exit": "os._exit(7)",
    "sys.exit": "sys.exit(7)",
    "raise": "raise RuntimeError('child failed')",
    "falls through": "pass",
}


def _fork_code(child_end: str) -> str:
    return (
        "import os, sys\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('child', flush=True)\n"
        f"    {child_end}\n"
        "else:\n"
        "    os.waitpid(pid, 0)\n"
        "    print('parent', os.getpid() == me)\n"
        "    sys.exit(3)\n"
    )


@pytest.mark.parametrize("ending", sorted(FORK_CHILD_ENDINGS))
async def test_fork_child_never_ends_the_run(scheduler: Scheduler, ending: str) -> None:
    code = "import os\nme = os.getpid()\n" + _fork_code(FORK_CHILD_ENDINGS[ending])
    result = await scheduler.run(code, timeout_seconds=30)
    assert "parent True" in result.stdout.splitlines(), (result.stdout, result.stderr)
    assert result.exit_code == 3, (result.stdout, result.stderr)
    assert "child" in result.stdout.splitlines()


async def test_fork_child_never_takes_over_the_session(scheduler: Scheduler) -> None:
    async with await scheduler.session() as s:
        assert (await s.exec("import os\nme = os.getpid()\nstate = 'kept'")).exit_code == 0
        for ending in sorted(FORK_CHILD_ENDINGS):
            r = await s.exec(_fork_code(FORK_CHILD_ENDINGS[ending]), timeout_seconds=30)
            assert "parent True" in r.stdout.splitlines(), (ending, r.stdout, r.stderr)
            assert r.exit_code == 3, (ending, r)
            # the next block runs in the parent interpreter, with its state
            after = await s.exec("print(os.getpid() == me, state)")
            assert after.stdout == "True kept\n", (ending, after.stdout, after.stderr)


# --------------------------------------------------------------------------- 2. a real __main__

PICKLE_CODE = """
import pickle, multiprocessing, concurrent.futures
def square(x):
    return x * x
class Point:
    def __init__(self, x):
        self.x = x
assert pickle.loads(pickle.dumps(square))(3) == 9
assert pickle.loads(pickle.dumps(Point(4))).x == 4
with multiprocessing.Pool(2) as pool:
    print('pool', pool.map(square, [1, 2, 3]))
with concurrent.futures.ProcessPoolExecutor(2) as ex:
    print('executor', list(ex.map(square, [4, 5])))
import __main__
print('main', __main__.square is square)
"""
PICKLE_OUT = "pool [1, 4, 9]\nexecutor [16, 25]\nmain True\n"


async def test_user_code_runs_in_a_real_main_module_run(scheduler: Scheduler) -> None:
    result = await scheduler.run(PICKLE_CODE, timeout_seconds=60)
    assert (result.exit_code, result.stdout) == (0, PICKLE_OUT), result.stderr


async def test_user_code_runs_in_a_real_main_module_session(scheduler: Scheduler) -> None:
    async with await scheduler.session() as s:
        r = await s.exec(PICKLE_CODE, timeout_seconds=60)
        assert (r.exit_code, r.stdout) == (0, PICKLE_OUT), r.stderr
        # and a later block still sees (and pickles) what an earlier one defined
        r = await s.exec("print(pickle.loads(pickle.dumps(Point(5))).x, square(6))")
        assert (r.exit_code, r.stdout) == (0, "5 36\n"), r.stderr


# --------------------------------------------------------------------------- 6. no_new_privs

NNP = {
    "python": "print([l for l in open('/proc/self/status') if l.startswith('NoNewPrivs')][0].split()[1])",
    "raw": "grep NoNewPrivs /proc/self/status | tr -s '\\t ' ' ' | cut -d' ' -f2",
    "javascript": (
        "console.log(require('fs').readFileSync('/proc/self/status', 'utf8')"
        ".split('\\n').find(l => l.startsWith('NoNewPrivs')).split(/\\s+/)[1])"
    ),
}


@pytest.mark.parametrize("language", sorted(NNP))
async def test_user_code_runs_with_no_new_privs(scheduler: Scheduler, language: str) -> None:
    result = await scheduler.run(NNP[language], language=language)
    assert (result.exit_code, result.stdout) == (0, "1\n"), result.stderr
    async with await scheduler.session(language=language) as s:
        r = await s.exec(NNP[language])
        assert (r.exit_code, r.stdout) == (0, "1\n"), r.stderr


# --------------------------------------------------------------------------- 4. /dev/fd, /dev/std*

DEV_RAW = (
    "for f in /dev/fd /dev/stdin /dev/stdout /dev/stderr; do [ -e \"$f\" ] && echo \"ok $f\"; done\n"
    "echo to-stderr > /dev/stderr\n"
    "echo to-stdout > /dev/stdout\n"
    "ls /dev/fd/ | grep -qx 2 && echo 'fd 2 listed'\n"
    "cat /dev/stdin </dev/null && echo 'stdin read'\n"
)
DEV_RAW_OUT = ("ok /dev/fd\nok /dev/stdin\nok /dev/stdout\nok /dev/stderr\nto-stdout\nfd 2 listed\n"
               "stdin read\n")
DEV_PY = (
    "with open('/dev/stdout', 'w') as f:\n    f.write('py-out\\n')\n"
    "with open('/dev/stderr', 'w') as f:\n    f.write('py-err\\n')\n"
)


async def test_dev_fd_and_std_streams_exist_run(scheduler: Scheduler) -> None:
    result = await scheduler.run(DEV_RAW, language="raw")
    assert (result.exit_code, result.stdout, result.stderr) == (0, DEV_RAW_OUT, "to-stderr\n")
    result = await scheduler.run(DEV_PY)
    assert (result.exit_code, result.stdout, result.stderr) == (0, "py-out\n", "py-err\n")


async def test_dev_fd_and_std_streams_exist_session(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="raw") as s:
        r = await s.exec(DEV_RAW)
        assert (r.exit_code, r.stdout, r.stderr) == (0, DEV_RAW_OUT, "to-stderr\n")
    async with await scheduler.session() as s:
        r = await s.exec(DEV_PY)
        assert (r.exit_code, r.stdout, r.stderr) == (0, "py-out\n", "py-err\n")


# --------------------------------------------------------------------------- 3. Node's globals

JS_GLOBALS = (
    "const names = ['performance', 'fetch', 'crypto', 'AbortController', 'atob', 'btoa', 'Blob',"
    " 'global', 'require', 'module', 'exports', '__filename', '__dirname', 'structuredClone',"
    " 'EventTarget', 'TextEncoder', 'URL', 'setImmediate', 'queueMicrotask', 'WebAssembly'];\n"
    "const missing = names.filter((n) => eval('typeof ' + n) === 'undefined');\n"
    "console.log(missing.length ? 'missing ' + missing.join(',') : 'all present');\n"
    "console.log(global === globalThis, typeof performance.now(), typeof require('fs').readFileSync,"
    " typeof module.exports, atob(btoa('ok')));\n"
    "console.log(Object.getPrototypeOf([]) === Array.prototype, [] instanceof Array,"
    " Object.keys(globalThis).filter((k) => /sbx|SBX/.test(k)).length);\n"
)
JS_GLOBALS_OUT = "all present\ntrue number function object ok\ntrue true 0\n"


async def test_javascript_has_nodes_normal_globals_run(scheduler: Scheduler) -> None:
    result = await scheduler.run(JS_GLOBALS, language="javascript")
    assert (result.exit_code, result.stdout) == (0, JS_GLOBALS_OUT), result.stderr


async def test_javascript_has_nodes_normal_globals_session(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="javascript") as s:
        r = await s.exec(JS_GLOBALS)
        assert (r.exit_code, r.stdout) == (0, JS_GLOBALS_OUT), r.stderr
        r = await s.exec("var kept = 41; let alsoKept = 1;")
        r = await s.exec("console.log(kept + alsoKept, typeof fetch)")
        assert (r.exit_code, r.stdout) == (0, "42 function\n"), r.stderr


# --------------------------------------------------------------------------- 5. room in the work area

DF = "import os\nv = os.statvfs('.')\nprint(v.f_blocks * v.f_frsize >> 20, v.f_bavail * v.f_frsize >> 20)"


def _df(stdout: str) -> tuple[int, int]:
    total, free = stdout.split()
    return int(total), int(free)


async def test_default_work_area_takes_a_100_mib_upload(scheduler: Scheduler) -> None:
    result = await scheduler.run(DF)
    _, free = _df(result.stdout)
    assert free >= (scheduler.config.max_file_bytes >> 20) + 64, result.stdout
    data = bytes(range(256)) * (100 * 4096)  # 100 MiB
    async with await scheduler.session() as s:
        await s.write_file("big.bin", data)
        r = await s.exec("import hashlib\nprint(hashlib.sha256(open('big.bin', 'rb').read()).hexdigest())")
        assert r.stdout.strip() == __import__("hashlib").sha256(data).hexdigest(), r.stderr


async def test_disk_size_option_per_session(scheduler: Scheduler) -> None:
    async with await scheduler.session(disk_size_mb=2048) as s:
        total, free = _df((await s.exec(DF)).stdout)
        assert total >= 1900 and free >= 1500, (total, free)
    async with await scheduler.session() as s:  # the default is unchanged by the session above
        total, _ = _df((await s.exec(DF)).stdout)
        assert total < 1500, total


async def test_disk_size_option_in_the_config_survives_snapshots() -> None:
    from exec_sandbox.config import SchedulerConfig

    async with scheduler_for_tests(SchedulerConfig(disk_size_mb=1536)) as sched:
        first = await sched.run(DF)
        assert sched.snapshot_cache is not None
        await sched.snapshot_cache.wait_saved()  # the first run's VM, saved under the sized key
        second = await sched.run(DF)
        for r in (first, second):
            total, free = _df(r.stdout)
            assert total >= 1400 and free >= 1100, (total, free, r.stderr)
        assert second.restored_from_snapshot


# --------------------------------------------------------------------------- 7. JavaScript from L1

JS_RANDOM = (
    "const c = require('crypto');\n"
    "console.log(Math.random(), c.randomBytes(16).toString('hex'), c.randomUUID(),"
    " Buffer.from(c.getRandomValues(new Uint8Array(16))).toString('hex'), process.pid, Math.random() < 1)"
)


async def test_restored_javascript_keeps_its_interpreter_and_draws_its_own_randomness() -> None:
    """A JS run restored from a snapshot is served by the snapshot's warm node (no restart: ~5 s
    under TCG before), which reseeds OpenSSL and Math.random in place: clones never repeat."""
    async with scheduler_for_tests() as sched:
        await sched.run("1", language="javascript")
        assert sched.snapshot_cache is not None
        await sched.snapshot_cache.wait_saved()
        runs = [await sched.run(JS_RANDOM, language="javascript") for _ in range(3)]
        sessions = [await sched.session(language="javascript") for _ in range(2)]
        try:
            execs = [await s.exec(JS_RANDOM) for s in sessions]
            assert all(s.restored_from_snapshot for s in sessions)
        finally:
            for s in sessions:
                await s.close()
    for r in [*runs, *execs]:
        assert r.exit_code == 0 and r.stdout.split()[-1] == "true", (r.stdout, r.stderr)
    assert all(r.restored_from_snapshot for r in runs)
    # The snapshot's own interpreter ran every block (a restart would have a clone's random pid).
    assert len({r.stdout.split()[4] for r in runs}) == 1 and len({r.stdout.split()[4] for r in execs}) == 1
    seen = [r.stdout.split()[:4] for r in [*runs, *execs]]
    for i in range(4):
        values = [s[i] for s in seen]
        assert len(set(values)) == len(values), f"clones repeated value #{i}: {values}"
