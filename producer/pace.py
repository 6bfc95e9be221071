"""How long a Rekognition scan takes at the account's quota, and the fleet that keeps that pace.

At Rekognition's per-account quota of calls per second a big bucket takes days, and that, not
the price per image, is what a user plans around. The quota is ``CELEBSCAN_REKOGNITION_TPS`` when
set; else the account's own value for RecognizeCelebrities from the Service Quotas API (the
applied quota, or the region's default when none was applied), which is also where it is raised.
The time an image takes is measured: the mean over the latest recognized images in this database
(``images.work_ms``: read, decode and the call; copies excluded). A worker process keeps
``CELEBSCAN_CALLS_IN_FLIGHT`` of them going at once, so the processes needed are the quota times
that time, divided by the calls each keeps in flight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from worker.settings import Settings, env_var

log = logging.getLogger(__name__)

#: What Service Quotas calls Rekognition, and the words naming the quota celebscan spends.
SERVICE_CODE = "rekognition"
QUOTA_WORDS = "recognizecelebrities"


@dataclass(frozen=True)
class Quota:
    calls_per_second: float
    source: str  # where the figure comes from, as the user reads it


@dataclass(frozen=True)
class Pace:
    """``calls`` at ``quota``: the time they take, and what keeps that pace."""

    calls: int
    quota: Quota
    seconds_per_image: float | None  # the measured time an image takes; None: not measured yet
    processes_per_machine: int
    machine_price: float  # USD per machine-hour
    calls_in_flight: int = 1  # images a worker process works at once

    @property
    def seconds(self) -> float:
        return self.calls / self.quota.calls_per_second

    @property
    def processes(self) -> int | None:
        """Worker processes whose calls in flight together reach the quota."""
        if self.seconds_per_image is None:
            return None
        return max(1, math.ceil(self.quota.calls_per_second * self.seconds_per_image / self.calls_in_flight))

    @property
    def machines(self) -> int | None:
        processes = self.processes
        return None if processes is None else math.ceil(processes / self.processes_per_machine)

    @property
    def machine_cost(self) -> float | None:
        machines = self.machines
        return None if machines is None else machines * self.machine_price * self.seconds / 3600


def rekognition_quota(settings: Settings) -> Quota | None:
    """The calls per second the fleet will get, or None when it cannot be found out."""
    if settings.rekognition_tps:
        return Quota(settings.rekognition_tps, env_var("rekognition_tps"))
    from worker.aws import AWS_ERRORS, client
    from worker.errors import ConfigurationError

    try:
        quotas = client("service-quotas", settings)
        applied = _celebrity_quota(quotas.get_paginator("list_service_quotas"))
        if applied is not None:
            return Quota(applied, f"the account's quota in {quotas.meta.region_name} (Service Quotas)")
        default = _celebrity_quota(quotas.get_paginator("list_aws_default_service_quotas"))
        if default is not None:
            return Quota(default, f"the default quota in {quotas.meta.region_name} (Service Quotas)")
    except (*AWS_ERRORS, ConfigurationError) as exc:
        log.info("Service Quotas not readable: %s", exc)
    return None


def _celebrity_quota(paginator) -> float | None:
    for page in paginator.paginate(ServiceCode=SERVICE_CODE):
        for quota in page.get("Quotas", ()):
            if QUOTA_WORDS in quota.get("QuotaName", "").replace(" ", "").lower():
                return float(quota["Value"])
    return None


def duration(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 05 min``, ``4 min 10 s``, ``12 s``."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"
