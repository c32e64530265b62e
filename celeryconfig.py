"""Celery settings for every amodal process (producer, stage workers, Flower).

Each value is chosen so that a job is never lost and never done twice in effect: messages are
acknowledged only after their step is written, and every step is idempotent (see ``tasks.stage``).
"""
from kombu import Exchange, Queue

from amodal.config import environment
from amodal.state import WORK_STAGES as STAGES

_env = environment()
broker_url = _env.broker_url
# Keep retrying the broker at start-up and after a Redis restart instead of exiting.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None

# JSON only: no pickle on the wire, and messages stay readable (ids and keys, never pixels).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]

# Job state lives in storage, not in a result backend: no results to store or expire in Redis.
task_ignore_result = True
result_backend = None

# One queue per stage, so each worker pool takes only the work its models can do; each bound to its own
# direct exchange by its own name as the key (a Queue given no exchange is bound to the default queue's,
# under the default queue's key, which is what every worker then declares).
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in STAGES]
task_default_queue = "finalize"
task_routes = {f"amodal.{name}": {"queue": name, "exchange": name, "routing_key": name} for name in STAGES}

# At-least-once delivery: ack after the step is written, and hand the message back if the worker
# process dies mid-task (OOM, preemption, SIGKILL). Steps are idempotent, so a redelivery is safe.
task_acks_late = True
task_reject_on_worker_lost = True
# One message in hand per process: a slow GPU step does not hoard messages other workers could take.
# (The inpaint worker raises its own prefetch to its batch size to fill a diffusion batch.)
worker_prefetch_multiplier = 1

# The longest step (an inpaint batch of 16 at 50 steps) takes seconds on an H100 and about a minute
# on a small card; the hard limit kills a hung step. Redis hands an unacknowledged message to
# another worker after the visibility timeout, which must outlast the longest step (or a running
# task would be delivered twice) and is what a job waits after its worker is lost whole: 6 minutes
# by default, not the transport's default hour.
# A worker routing a job on waits out a broker outage (the job's next state is committed; losing its
# message would strand it). kombu retries forever when max_retries is None. The producer keeps Celery's
# default policy and fails fast. Applied by workers.main.
WORKER_PUBLISH_RETRY_POLICY = {"max_retries": None, "interval_start": 0.5, "interval_step": 0.5, "interval_max": 5}

task_time_limit = _env.task_time_limit
task_soft_time_limit = _env.task_time_limit - 30
broker_transport_options = {
    "visibility_timeout": _env.visibility_timeout,
    # Sweep the unacknowledged messages of lost workers every 5 s (kombu's default scans every 10th
    # 10-second sweep, so a lost message came back up to ~100 s after the visibility timeout).
    "unacked_restore_interval": 5,
    "unacked_restore_throttle": 1,
    # Survive short Redis outages without dropping the connection for good.
    "retry_on_timeout": True,
    "health_check_interval": 10,
}

if broker_url.startswith("filesystem://"):
    # kombu's serverless transport over a shared folder: one host, no Redis (benchmarks on machines
    # that cannot run a broker). No visibility timeout: a message taken by a lost worker is lost.
    _folder = _env.broker_folder
    broker_transport_options = {"data_folder_in": _folder, "data_folder_out": _folder,
                                "control_folder": f"{_folder}/control", "polling_interval": 0.05}

# Events for Flower: task lifecycle and worker heartbeats.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True

# A worker process loads and warms its models after the fork, before it reports up: give it time.
worker_proc_alive_timeout = _env.warmup_timeout

# Workers hold large models: never recycle a process for memory leaks of small objects, and let a
# SIGTERM finish (or hand back) the task in hand before the process exits.
worker_max_tasks_per_child = None
worker_cancel_long_running_tasks_on_connection_loss = True
# On SIGTERM, give the task in hand a minute to finish; after that it is handed back to the queue.
worker_soft_shutdown_timeout = 60.0
worker_hijack_root_logger = False
