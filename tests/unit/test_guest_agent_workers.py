"""The guest agent's request workers: a waiting thread takes the next job; concurrent jobs each get
a thread; a failing job does not lose its thread."""

from __future__ import annotations

import threading

from tests.support.guest_agent import load_agent

agent = load_agent("sbx_guest_agent_workers_test")


def wait_idle(workers: object, count: int) -> None:
    for _ in range(500):
        with workers.lock:  # type: ignore[attr-defined]
            if workers.idle == count:  # type: ignore[attr-defined]
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"never {count} idle workers")


def test_a_waiting_worker_takes_the_next_job_and_concurrent_jobs_get_their_own() -> None:
    workers = agent.Workers()
    seen: list[int] = []
    done = threading.Event()
    workers.submit(lambda: seen.append(threading.get_ident()))
    wait_idle(workers, 1)
    workers.submit(lambda: (seen.append(threading.get_ident()), done.set()))
    assert done.wait(5)
    assert seen[0] == seen[1]  # the same thread ran both

    release = threading.Event()
    started = threading.Semaphore(0)
    idents: list[int] = []

    def blocking() -> None:
        idents.append(threading.get_ident())
        started.release()
        release.wait(5)

    wait_idle(workers, 1)
    for _ in range(3):
        workers.submit(blocking)
    for _ in range(3):
        assert started.acquire(timeout=5)  # all three run at once
    assert len(set(idents)) == 3
    release.set()
    wait_idle(workers, 3)


def test_a_failing_job_keeps_its_thread() -> None:
    workers = agent.Workers()

    def boom() -> None:
        raise RuntimeError("job failed")

    workers.submit(boom)
    wait_idle(workers, 1)
    ran = threading.Event()
    workers.submit(ran.set)
    assert ran.wait(5)
    wait_idle(workers, 1)
