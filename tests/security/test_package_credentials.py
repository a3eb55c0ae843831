"""The package edge, as the attack: guest code that hunts for the host's index credentials.

The host's pip and npm are configured with secrets (basic auth in the index URL, an npm auth
token) - exactly what a corporate mirror needs. The packages reach the guest; the guest code then
searches its environment and every file the install could have touched for those secrets, and
tries the network. Nothing may be found, and no connection may succeed. The lock handed back to
the caller holds no secret either.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from exec_sandbox import Scheduler
from tests.integration.package_index import LocalIndex, package_scheduler, serve_index

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

PIP_SECRET = "pipS3CRETtoken4711"
NPM_SECRET = "npmS3CRETtoken0815"

# The secrets travel reversed, so the hunting script (a file in the guest too) does not find itself.
HUNT = """
import os
secrets = [s[::-1] for s in @SECRETS@]
found = [f"env:{k}" for k, v in os.environ.items() if any(s in v or s in k for s in secrets)]
for top in ("/usr/local", "/home", "/opt", "/etc", "/root", "/tmp", "/var", "/run"):
    for dirpath, dirs, files in os.walk(top):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as fh:
                    data = fh.read(1 << 20)
            except OSError:
                continue
            if any(s.encode() in data for s in secrets):
                found.append(path)
print("FOUND", found)
""".replace("@SECRETS@", repr((PIP_SECRET[::-1], NPM_SECRET[::-1])))


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalIndex]:
    work = tmp_path_factory.mktemp("index")
    with serve_index(LocalIndex(work)) as idx, pytest.MonkeyPatch.context() as mp:
        idx.add_wheel("sbxdemo", "2.0")
        idx.add_npm("sbxleft", "1.2.0", main="module.exports = 1;")
        env = idx.env()
        host = idx.url.removeprefix("http://")
        env["PIP_INDEX_URL"] = f"http://sbxuser:{PIP_SECRET}@{host}/simple/"
        (work / "npmrc").write_text(f"//{host}/:_authToken={NPM_SECRET}\n")
        for key, value in env.items():
            mp.setenv(key, value)
        yield idx


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scheduler(index: LocalIndex, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Scheduler]:
    async with package_scheduler(tmp_path_factory.mktemp("caches"), timeout_s=120) as s:
        yield s


async def test_python_guest_finds_no_index_credentials(scheduler: Scheduler) -> None:
    result = await scheduler.run(HUNT, packages=["sbxdemo"], timeout_seconds=120)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "FOUND []\n"
    assert result.packages is not None and PIP_SECRET not in result.packages.model_dump_json()
    probe = await scheduler.run("import sbxdemo; print(sbxdemo.__version__)", packages=["sbxdemo"])
    assert probe.stdout == "2.0\n"  # the packages did arrive, through the authenticated index


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed on this host")
async def test_javascript_guest_finds_no_registry_token(scheduler: Scheduler) -> None:
    async with await scheduler.session(language="javascript", packages=["sbxleft@1"]) as s:
        assert s.packages is not None and NPM_SECRET not in s.packages.model_dump_json()
        listing = await s.exec("console.log(require('sbxleft'))")
        assert listing.stdout == "1\n", listing.stderr
        # The JavaScript image has python3 too (the agent): hunt with the same code.
        await s.write_file("hunt.py", HUNT.encode())
        found = await s.exec(
            "console.log(require('child_process').execFileSync('python3', ['hunt.py']).toString().trim())"
        )
        assert found.stdout == "FOUND []\n", found.stderr
        # The hunt does find a secret that is there (so its silence above means something).
        await s.write_file("planted.txt", f"token={NPM_SECRET}".encode())
        again = await s.exec(
            "console.log(require('child_process').execFileSync('python3', ['hunt.py']).toString().trim())"
        )
        assert again.stdout == "FOUND ['/home/sandbox/planted.txt']\n", again.stderr
