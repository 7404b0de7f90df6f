"""All configuration, read from `JOBQUEUE_*` environment variables (see the README table)."""

from __future__ import annotations

import base64
import binascii
import difflib
import functools
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, Protocol
from urllib.parse import urlsplit

from limits import parse_many
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

PREFIX = "JOBQUEUE_"
# Read by the command-line client (jobqueue submit …), not by the server: never a typo.
CLIENT_VARIABLES = {"JOBQUEUE_URL", "JOBQUEUE_API_KEY"}


class KindLimits(BaseModel):
    """How many threads serve a job kind, how many jobs may wait, how long `/put` waits and how
    often a failed job runs again: JOBQUEUE_<NAME>_WORKERS, _QUEUE_SIZE, _TIMEOUT and
    _RETRIES, else what its JobKind declares."""

    model_config = ConfigDict(frozen=True)

    workers: int = Field(1, ge=1)
    queue_size: int = Field(10, ge=1)
    timeout: float = Field(60.0, gt=0)
    # Runs after the first that a failed job gets (its Retry's attempts - 1; 0: none).
    retries: int = Field(0, ge=0, le=100)


class KindDefaults(Protocol):
    """What Settings.limits reads of a JobKind (jobs.py): its name and its defaults."""

    name: str
    workers: int
    queue_size: int
    timeout: float
    retry: object | None  # a jobs.Retry, or None


class Settings(BaseSettings):
    # hide_input_in_errors: a refused setting may be a secret (a key, a database password).
    model_config = SettingsConfigDict(env_prefix="JOBQUEUE_", hide_input_in_errors=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    out_dir: Path = Path("out")
    rate_limit: str = "60/minute"
    rate_limit_storage: SecretStr = Field(
        SecretStr(""), description="Where rate-limit counters live, e.g. redis://host:6379 to "
        "share them across API replicas; empty: in this process")
    db_path: Path | None = Field(None, description="Job records; default <out_dir>/jobs.db")
    max_upload_mb: float = Field(1024, gt=0)
    result_ttl: float = Field(86400, gt=0, description="Seconds finished jobs are kept")

    kinds: str = Field("message,pdf2image,video", description="Comma-separated job kinds "
                       "served: built-in names, entry points (group jobqueue.kinds) or "
                       "package.module:ATTRIBUTE")

    job_max_seconds: float = Field(3600, gt=0, description="Longest a POST /jobs job may run")
    max_queued_per_key: int = Field(0, ge=0, description="Jobs of one kind one API key (or "
                                    "client address) may have waiting; past it 429. 0: no cap")
    max_priority_per_key: SecretStr = Field(
        SecretStr(""), description="Comma-separated key=max pairs: the highest priority each "
        "API key may ask for (* for any other key); empty: 10 for everyone")

    pdf_max_pages: int = Field(500, ge=1, description="Longest PDF, in pages")
    video_max_seconds: float = Field(3600, gt=0, description="Longest video")
    video_max_pixels: int = Field(3840 * 2160, ge=4,
                                  description="Largest video frame, input or output, in pixels")
    video_max_fps: float = Field(240, gt=0, description="Highest video frame rate")
    video_max_mb: float = Field(3072, ge=512, description="Address space each ffmpeg or "
                                "ffprobe child may use (RLIMIT_AS), in MB")

    shutdown_grace: float = Field(10, ge=0, description="Seconds running jobs get on shutdown")

    preview_streams: int = Field(8, ge=1, description="ffmpeg decoders /preview.mjpg may run")
    max_streams: int = Field(200, ge=1, description="Event streams open at once")
    max_uploads: int = Field(16, ge=1, description="Multipart uploads at once")
    min_upload_kbps: float = Field(16, ge=0, description="Slowest body, in KB/s over 30 s")
    header_timeout: float = Field(10, gt=0, description="Seconds a request's headers may take")
    access_log: Literal["jobs", "all", "off"] = Field(
        "jobs", description="jobs: a line per request that submits, changes or deletes a job, "
        "and per error answer; all: a line per request; off: none")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: plain lines; json: one JSON object a line (time, level, "
        "logger, message, jobId, traceId and spanId when there are any)")
    trusted_proxies: str = Field("", description="Comma-separated addresses whose "
                                 "X-Forwarded-For is believed; empty: nobody's")

    database_url: SecretStr = Field(SecretStr(""), description="postgresql://... selects the "
                                    "distributed engine; empty: the embedded one")
    storage_url: str = Field("", description="s3://bucket/prefix keeps uploads and results "
                             "in object storage (distributed mode); empty: in out_dir")
    s3_endpoint: str = Field("", description="The S3 API's address, e.g. http://127.0.0.1:8333 "
                             "for SeaweedFS or MinIO; empty: AWS (or AWS_ENDPOINT_URL)")
    api_keys: SecretStr = Field(SecretStr(""),
                                description="Comma-separated API keys; empty: no keys needed")
    metrics_token: SecretStr = Field(SecretStr(""), description="Bearer token /metrics "
                                     "needs; empty: open on a loopback-only server")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Port of a worker "
                                     "process's /metrics; 0: a free one, logged")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS")
    public_url: str = Field("", description="The address clients reach the server at, e.g. "
                            "https://jobs.example.com: links in answers are absolute from it; "
                            "empty: links are paths (never from the request's Host header)")

    webhook_secret: SecretStr = Field(
        SecretStr(""), description="whsec_ + base64: the key webhook deliveries are signed "
        "with (Standard Webhooks); callbacks need it")
    webhook_urls: SecretStr = Field(
        SecretStr(""), description="Comma-separated key=url pairs: where each API key's jobs "
        "POST their status document when they end, unless a job names its own callbackUrl "
        "(* for any other key, or for every job without API keys)")
    webhook_retry_hours: float = Field(24, gt=0, description="Hours after a job's end its "
                                       "webhook delivery is retried before it has failed")
    webhook_allow_hosts: str = Field("", description="Comma-separated host names a callback "
                                     "may go to even though they resolve to a loopback, "
                                     "private or other non-public address")

    pdf_engine: Literal["pdfium", "poppler"] = "pdfium"
    pdf_max_pixels: int = Field(100_000_000, ge=1,
                                description="Largest page to render, in pixels at its dpi")
    pdf_smooth_images: bool = Field(False, description="pdfium: anti-alias images as they are "
                                    "scaled (slower, larger PNGs)")
    render_max_mb: float = Field(1024, ge=256, description="Address space each PDF render "
                                 "child may use (RLIMIT_AS), in MB")
    png_compression: int = Field(3, ge=0, le=9, description="zlib level of PNGs the pdfium "
                                 "engine writes (poppler's pdftoppm writes its own)")

    @field_validator("rate_limit")
    @classmethod
    def valid_rate_limit(cls, value: str) -> str:
        parse_many(value)  # raises ValueError for text slowapi would not understand
        return value

    @field_validator("api_keys", "metrics_token")
    @classmethod
    def ascii_secrets(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        # A header carries ASCII: a client sends other text as latin-1 bytes, or refuses to,
        # so a key such as "clé" would work for some clients only. Refused here, at start.
        for number, key in enumerate(value.get_secret_value().split(","), 1):
            if any(not " " <= char <= "~" for char in key.strip()):
                raise ValueError(f"JOBQUEUE_{info.field_name.upper()}: value {number} has a "
                                 "character that is not printable ASCII (letters, digits and "
                                 "punctuation only: HTTP headers carry nothing else)")
        return value

    @field_validator("public_url")
    @classmethod
    def valid_public_url(cls, value: str) -> str:
        if not value:
            return value
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query \
                or parts.fragment:
            raise ValueError("JOBQUEUE_PUBLIC_URL must be an http:// or https:// address "
                             "(with a path if the server is behind a prefix), without a query: "
                             f"not {value!r}")
        return value.rstrip("/")

    @field_validator("webhook_secret")
    @classmethod
    def valid_webhook_secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value():
            webhook_key(value.get_secret_value())  # ValueError saying what is wrong
        return value

    @field_validator("webhook_urls")
    @classmethod
    def valid_webhook_urls(cls, value: SecretStr, info: ValidationInfo) -> SecretStr:
        webhook_urls(value.get_secret_value())  # ValueError naming the bad pair
        if value.get_secret_value().strip() and not info.data.get(
                "webhook_secret", SecretStr("")).get_secret_value():
            raise ValueError("JOBQUEUE_WEBHOOK_URLS needs JOBQUEUE_WEBHOOK_SECRET, the key "
                             "deliveries are signed with")
        return value

    def webhook_url_for(self, api_key: str | None) -> str | None:
        """The default callback URL of `api_key`'s jobs (JOBQUEUE_WEBHOOK_URLS), if any."""
        urls = webhook_urls(self.webhook_urls.get_secret_value())
        return urls.get(api_key or "", urls.get("*")) or None

    @property
    def webhook_allow_host_list(self) -> list[str]:
        return [host.strip().lower().strip("[]") for host in self.webhook_allow_hosts.split(",")
                if host.strip()]

    @field_validator("max_priority_per_key")
    @classmethod
    def valid_priority_caps(cls, value: SecretStr) -> SecretStr:
        priority_caps(value.get_secret_value())  # ValueError naming the bad pair
        return value

    def priority_cap(self, api_key: str | None) -> int:
        """The highest priority `api_key` may ask for (JOBQUEUE_MAX_PRIORITY_PER_KEY)."""
        caps = priority_caps(self.max_priority_per_key.get_secret_value())
        return caps.get(api_key or "", caps.get("*", MAX_PRIORITY))

    @property
    def api_key_list(self) -> list[str]:
        return list(_key_list(self.api_keys.get_secret_value()))

    @property
    def trusted_proxy_list(self) -> list[str]:
        return [proxy.strip() for proxy in self.trusted_proxies.split(",") if proxy.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def job_db(self) -> Path:
        return self.db_path or self.out_dir / "jobs.db"

    # Each kind's limits, read from the environment once (they are fixed for a process).
    _limits: dict[str, KindLimits] = PrivateAttr(default_factory=dict)

    def limits(self, kind: KindDefaults) -> KindLimits:
        """A kind's JOBQUEUE_<NAME>_WORKERS, _QUEUE_SIZE and _TIMEOUT, else its defaults.

        ValueError naming the variable for a value that is not a number in range."""
        made = self._limits  # a private attribute: each read goes through __getattr__
        limits = made.get(kind.name)
        if limits is None:
            limits = made[kind.name] = kind_limits(kind, os.environ)
        return limits


@functools.lru_cache(maxsize=8)
def _key_list(text: str) -> tuple[str, ...]:
    return tuple(key.strip() for key in text.split(",") if key.strip())


# The priorities a job may have (POST /jobs and /put's `priority`): higher runs first.
MIN_PRIORITY, MAX_PRIORITY = -10, 10


# Parsed once per value, not on every submission that asks (read them, never change them).
@functools.lru_cache(maxsize=8)
def priority_caps(text: str) -> dict[str, int]:
    """JOBQUEUE_MAX_PRIORITY_PER_KEY's `key=max` pairs, by key (`*`: any other key)."""
    caps = {}
    for number, pair in enumerate((p.strip() for p in text.split(",") if p.strip()), 1):
        key, _, cap = pair.rpartition("=")
        try:
            value = int(cap)
        except ValueError:
            value = None
        if not key.strip() or value is None or not MIN_PRIORITY <= value <= MAX_PRIORITY:
            raise ValueError(f"JOBQUEUE_MAX_PRIORITY_PER_KEY: pair {number} is not key=max with "
                             f"max a whole number from {MIN_PRIORITY} to {MAX_PRIORITY}")
        caps[key.strip()] = value
    return caps


def webhook_key(secret: str) -> bytes:
    """JOBQUEUE_WEBHOOK_SECRET's key: `whsec_` + base64 of at least 16 bytes (as
    standardwebhooks and Svix make them); ValueError otherwise."""
    if not secret.startswith("whsec_"):
        raise ValueError("JOBQUEUE_WEBHOOK_SECRET must be whsec_ followed by base64, such as "
                         "python -c \"import base64, secrets; print('whsec_' + "
                         "base64.b64encode(secrets.token_bytes(32)).decode())\"")
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("JOBQUEUE_WEBHOOK_SECRET: what follows whsec_ is not base64") from None
    if len(key) < 16:
        raise ValueError("JOBQUEUE_WEBHOOK_SECRET: the key is shorter than 16 bytes")
    return key


@functools.lru_cache(maxsize=8)
def webhook_urls(text: str) -> dict[str, str]:
    """JOBQUEUE_WEBHOOK_URLS's `key=url` pairs, by API key (`*`: any other key); the key ends
    at the first `=`."""
    urls = {}
    for number, pair in enumerate((p.strip() for p in text.split(",") if p.strip()), 1):
        key, _, url = pair.partition("=")
        parts = urlsplit(url.strip())
        if not key.strip() or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"JOBQUEUE_WEBHOOK_URLS: pair {number} is not key=url with an "
                             "http:// or https:// URL")
        urls[key.strip()] = url.strip()
    return urls


def kind_limits(kind: KindDefaults, environ: Mapping[str, str]) -> KindLimits:
    names = kind_variables(kind.name)
    retry = getattr(kind, "retry", None)
    values = {"workers": kind.workers, "queue_size": kind.queue_size, "timeout": kind.timeout,
              "retries": retry.attempts - 1 if retry is not None else 0}
    values.update({field: environ[name] for field, name in names.items() if name in environ})
    try:
        return KindLimits.model_validate(values)
    except ValidationError as error:
        problems = "; ".join(f"{names[str(e['loc'][0])]}: {e['msg']}" for e in error.errors())
        raise ValueError(f"job kind {kind.name}: {problems}") from None


def kind_variables(kind_name: str) -> dict[str, str]:
    """The environment variables of a kind's limits, by KindLimits field."""
    return {field: f"{PREFIX}{kind_name.upper()}_{field.upper()}"
            for field in KindLimits.model_fields}


def unknown_variables(kind_names: Iterable[str],
                      environ: Mapping[str, str] = os.environ) -> list[str]:
    """A warning for each JOBQUEUE_* variable that is no setting and no served kind's limit,
    naming the closest one: a typo would otherwise be silently ignored."""
    known = {PREFIX + name.upper() for name in Settings.model_fields} | CLIENT_VARIABLES
    for name in kind_names:
        known.update(kind_variables(name).values())
    warnings = []
    for variable in sorted(name for name in environ if name.upper().startswith(PREFIX)):
        if variable.upper() in known:
            continue
        closest = difflib.get_close_matches(variable.upper(), known, n=1, cutoff=0.6)
        hint = f"; did you mean {closest[0]}?" if closest else ""
        warnings.append(f"{variable} is not a jobqueue setting (ignored){hint}")
    return warnings

