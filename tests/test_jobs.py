from datetime import timedelta

from pony.orm import db_session

from provisioner import jobs
from provisioner.models import Instance, Job, LogEntry, utcnow
from provisioner.worker import recover_abandoned


def make_instance(name="janes-shop", port=19100):
    return Instance(subdomain=name, site_name="J", admin_email="j@e.com", port=port)


def test_enqueue_coalesces_identical_waiting_jobs(config):
    with db_session:
        instance = make_instance()
        first = jobs.enqueue("converge", instance=instance)
        second = jobs.enqueue("converge", instance=instance)
        assert first is second
        assert Job.select().count() == 1


def test_claim_takes_one_job_per_instance(config):
    with db_session:
        a, b = make_instance("shop-a", 19100), make_instance("shop-b", 19101)
        Job(kind="converge", instance=a)
        Job(kind="welcome_email", instance=a)
        Job(kind="converge", instance=b)
    with db_session:
        claimed = jobs.claim_due()
        assert len(claimed) == 2
        assert {Job[j].instance.subdomain for j in claimed} == {"shop-a", "shop-b"}
        assert all(Job[j].state == "running" and Job[j].attempts == 1 for j in claimed)
    with db_session:
        assert jobs.claim_due() == [], "shop-a's second job must wait for its first"


def test_failures_back_off_then_end_failed_with_the_error(config):
    with db_session:
        job = Job(kind="converge", instance=make_instance())
    for attempt in range(1, 4):
        with db_session:
            Job[job.id].next_run_at = utcnow()
            assert jobs.claim_due() == [job.id]
            retrying = jobs.fail(Job[job.id], f"boom {attempt}", max_attempts=3, base_seconds=10)
            assert retrying == (attempt < 3)
            if retrying:
                wait = Job[job.id].next_run_at - utcnow()
                assert timedelta(seconds=10 * 2 ** (attempt - 1) - 2) < wait
    with db_session:
        failed = Job[job.id]
        assert (failed.state, failed.attempts, failed.last_error) == ("failed", 3, "boom 3")
        assert LogEntry.select(lambda e: e.level == "error").count() == 3
        assert jobs.claim_due() == []


def test_a_job_left_running_by_a_crash_is_picked_up_again(config):
    with db_session:
        job = Job(kind="converge", instance=make_instance())
    with db_session:
        assert jobs.claim_due() == [job.id]
    # The worker process dies here; a new one starts.
    assert recover_abandoned() == 1
    with db_session:
        assert jobs.claim_due() == [job.id]
        assert Job[job.id].attempts == 2


def test_an_expired_lease_is_claimable_without_a_restart(config):
    with db_session:
        job = Job(kind="converge", instance=make_instance(), state="running",
                  locked_until=utcnow() - timedelta(seconds=1))
    with db_session:
        assert jobs.claim_due() == [job.id]
