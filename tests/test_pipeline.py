"""The pipeline's own rules, with jobs made up by the test (the sources' tests run it
against real Postfix and Maildir): what a dropped job gives back, how the commit loop
gathers its batches."""

from __future__ import annotations

import contextlib
import io
from dataclasses import replace

from conftest import wait_until

from spoolscan.model import Job, MessageInfo, Opened, Outcome, ScanResult, Verdict
from spoolscan.runner import build_worker


def made_up_job(identity: str, discarded: list[str] | None = None) -> Job:
    @contextlib.contextmanager
    def opener():  # type: ignore[no-untyped-def]
        yield Opened(stream=io.BytesIO(b"Subject: made up\n\nhello\n"))

    info = MessageInfo(source="test", kind="file", identity=identity, location=identity)
    discard = None if discarded is None else (lambda: discarded.append(identity))
    return Job(info=info, open=opener, discard=discard)


def test_the_pipeline_gives_back_what_a_dropped_or_scanned_job_kept(config, store):
    """A job refused as a duplicate is discarded at once; the one taken is discarded
    once scanned."""
    worker = build_worker(replace(config, sources=()), store)
    discarded: list[str] = []
    first, duplicate = made_up_job("one", discarded), made_up_job("one", [])
    duplicate.discard = lambda: discarded.append("duplicate")
    assert worker.submit(first)
    assert not worker.submit(duplicate)
    assert discarded == ["duplicate"]
    worker.start()
    try:
        wait_until(lambda: "one" in discarded)
    finally:
        worker.stop()
    assert discarded == ["duplicate", "one"]


def test_a_batch_holds_the_outcomes_that_finished_together(config, store):
    """Outcomes waiting for the commit loop go into one batch with the first."""
    worker = build_worker(replace(config, sources=()), store)
    jobs = [made_up_job(f"m{i}") for i in range(6)]
    for job in jobs:
        assert worker.submit(job)  # in the pipeline (not started: nothing takes them)
    outcomes = [Outcome(job, job.info, ScanResult(Verdict.CLEAN)) for job in jobs]
    for outcome in outcomes[1:]:
        worker._outcomes.put(outcome)
    assert worker._gather(outcomes[0]) == outcomes


def test_a_scan_that_raises_anything_is_an_error_and_its_thread_goes_on(config, store):
    """Even a SystemExit from a scan becomes that message's error; the scanning thread
    takes the next job."""
    worker = build_worker(replace(config, sources=(), clamd=replace(config.clamd,
                                                                    concurrency=1)),
                          store)
    scan, discarded = worker.service.scan, []

    def exploding(job):  # type: ignore[no-untyped-def]
        if job.info.identity == "bad":
            raise SystemExit("a scan that exits")
        return scan(job)

    worker.service.scan = exploding  # type: ignore[method-assign]
    worker.start()
    try:
        assert worker.submit(made_up_job("bad", discarded))
        assert worker.submit(made_up_job("good", discarded))
        wait_until(lambda: discarded == ["bad", "good"] and worker.in_pipeline() == 0)
        assert all(t.is_alive() for t in worker._threads)
    finally:
        worker.stop()


def test_a_job_queued_as_the_scanners_stop_is_given_back(config, store):
    """A source that submits just as the worker stops (the scanners already gone): the
    job is given back and dropped (the next start's sweep finds the mail) rather than
    left in the queue with what it keeps open, and the stop completes."""
    worker = build_worker(replace(config, sources=()), store)
    worker.start()
    worker._halt.set()  # what stop() does; the scanners end, the queue being empty
    wait_until(lambda: not any(t.is_alive() for t in worker._threads[:-1]))
    committer, discarded = worker._threads[-1], []
    assert worker.submit(made_up_job("late", discarded))  # accepted: not yet stopping
    worker.stop(timeout=20)
    assert discarded == ["late"] and worker.in_pipeline() == 0
    assert not committer.is_alive()


def test_a_database_outage_costs_one_wait_per_batch_of_unreadable_messages(config, store):
    """Several unreadable messages in one batch while the database is locked: the store
    is asked once (each attempt can wait out the busy timeout), the rest are left for
    the next sweep, and nothing is recorded."""
    from sqlalchemy.exc import OperationalError

    from spoolscan.model import ContentUnavailable

    worker = build_worker(replace(config, sources=()), store)
    calls: list[str] = []

    def locked(info, detail, *, retry):  # type: ignore[no-untyped-def]
        calls.append(info.identity)
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    worker.store.note_failure = locked  # type: ignore[method-assign]
    jobs = [made_up_job(f"unreadable-{i}") for i in range(3)]
    worker.process([Outcome(job, job.info, ScanResult(Verdict.ERROR, detail="corrupt"),
                            unavailable=ContentUnavailable("corrupt")) for job in jobs])
    assert calls == ["unreadable-0"]
    assert len(worker._unrecorded) == 3  # handed over again once out of the pipeline
