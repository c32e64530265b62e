"""Checks made before work starts (the broker answers, the storage is usable) and the one-line
explanation of a service's error."""
from __future__ import annotations

from kombu.utils.url import maybe_sanitize_url

from amodal.config import environment
from amodal.errors import ServiceError

BROKER_TIMEOUT = 5.0  # seconds a producer waits for the broker before saying it does not answer


def broker_url(url: str | None = None) -> str:
    """``url`` (default: ``AMODAL_BROKER_URL``) with its password masked."""
    return maybe_sanitize_url(url or environment().broker_url)


def check_broker(url: str | None = None, timeout: float = BROKER_TIMEOUT) -> None:
    """Raise :class:`ServiceError` unless the broker at ``url`` (default: ``AMODAL_BROKER_URL``) answers
    within ``timeout`` seconds."""
    from tasks.app import broker

    with broker(url) as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - kombu raises its own and the transport's errors
            raise ServiceError(f"the broker at {broker_url(url)} does not answer "
                               f"({_reason(exc)}); start Redis or point AMODAL_BROKER_URL at it") from exc


def check_services(client, writes: bool = True) -> None:
    """Before a producer command: the client's storage answers (and, for one that ``writes``, keeps
    create-only writes) and the broker answers."""
    from amodal.storage import check_storage

    check_storage(client.store, probe_writes=writes)
    check_broker(client.broker_url)


def explain_service_error(exc: BaseException) -> tuple[int, str] | None:
    """(exit code, line) for an error of the broker or of S3 met mid-command; None if it is neither."""
    import botocore.exceptions as boto
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    if isinstance(exc, (OperationalError, RedisConnectionError)):
        return 1, f"the broker at {broker_url()} does not answer ({_reason(exc)}); start Redis or point " \
                  "AMODAL_BROKER_URL at it"
    if isinstance(exc, ResponseError) and str(exc).startswith("OOM"):
        return 1, f"the broker at {broker_url()} is full and refused a message ({_reason(exc)}); give Redis more " \
                  "maxmemory or let the workers drain it, then run the same command again"
    if isinstance(exc, boto.NoCredentialsError):
        return 2, "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    if isinstance(exc, (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ReadTimeoutError)):
        return 1, f"cannot reach the S3 endpoint ({_reason(exc)}); check AWS_ENDPOINT_URL and the server"
    if isinstance(exc, boto.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "NoSuchBucket":
            return 2, f"the bucket does not exist ({_reason(exc)}); create it or fix AMODAL_STORAGE_URL"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken"):
            return 2, f"S3 refused the credentials ({code}); check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        return 1, f"S3 failed: {_reason(exc)}"
    return None


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
