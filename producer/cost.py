"""What a scan costs with a paid recognizer: Rekognition's tiered price per image, its price per
minute of video, estimates, budgets.

Rekognition bills each image analysed by RecognizeCelebrities (an "Image API Group 2" call) at a
price that falls with the images already billed to the account this month. The tiers are a
setting (``CELEBSCAN_REKOGNITION_PRICES``), so another region or a new price list is one variable.
Rekognition Video bills each minute of stored video analysed (``CELEBSCAN_REKOGNITION_VIDEO_PRICE``).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from dataclasses import dataclass, field

from worker.errors import ConfigurationError
from worker.recognizers.rekognition import MAX_BYTES, MAX_S3_OBJECT_BYTES
from worker.settings import Settings


@dataclass(frozen=True)
class Tier:
    price: float  # USD per image
    images: float  # how many images this tier covers (math.inf for the last)


@dataclass(frozen=True)
class PriceList:
    tiers: tuple[Tier, ...]

    @classmethod
    def parse(cls, text: str) -> PriceList:
        """``"PRICE:IMAGES,PRICE:IMAGES,...,PRICE"``: each tier's price for its next IMAGES images."""
        tiers = []
        parts = [part.strip() for part in text.split(",") if part.strip()]
        try:
            for number, part in enumerate(parts):
                price, _, images = part.partition(":")
                last = number == len(parts) - 1
                if not images and not last:
                    raise ValueError(f"tier {part!r} needs an image count")
                tiers.append(Tier(float(price), math.inf if last and not images else float(images)))
        except ValueError as exc:
            raise ConfigurationError(f"bad Rekognition price list {text!r}: {exc}") from exc
        if not tiers or any(t.price < 0 or t.images <= 0 for t in tiers):
            raise ConfigurationError(f"bad Rekognition price list {text!r}")
        if tiers[-1].images != math.inf:
            tiers.append(Tier(tiers[-1].price, math.inf))
        return cls(tuple(tiers))

    def cost(self, images: int, already_billed: int = 0) -> float:
        """USD for ``images`` more images after ``already_billed`` this month."""
        total, start = 0.0, 0.0
        remaining: float = images
        for tier in self.tiers:
            end = start + tier.images
            if already_billed < end and remaining > 0:
                in_tier = min(remaining, end - max(start, already_billed))
                total += in_tier * tier.price
                remaining -= in_tier
            start = end
        return total

    def price_at(self, billed: float) -> float:
        """The price of the image billed after ``billed`` others this month."""
        start = 0.0
        for tier in self.tiers:
            if billed < start + tier.images:
                return tier.price
            start += tier.images
        return self.tiers[-1].price

    def images_within(self, budget: float, already_billed: int = 0) -> int:
        """The most images whose cost stays within ``budget`` USD."""
        count: float = 0
        start, left = 0.0, budget
        for tier in self.tiers:
            end = start + tier.images
            if already_billed < end:
                available = end - max(start, already_billed)
                affordable = math.inf if tier.price == 0 else math.floor(left / tier.price + 1e-9)
                taken = min(available, affordable)
                count += taken
                left -= taken * tier.price
                if taken < available:
                    break
            start = end
        return int(count)


def usd(amount: float) -> str:
    """Dollars to the cent, or to a hundredth of a cent under a dollar (a few calls cost $0.0030)."""
    return f"${amount:,.2f}" if amount >= 1 or amount == 0 else f"${amount:.4f}"


def price_list(settings: Settings) -> PriceList:
    return PriceList.parse(settings.rekognition_prices)


def budget_unit_usd(settings: Settings, images: int) -> float:
    """The price of the last of ``images`` a budget affords (the cheapest: tiers fall): a video's
    cost taken out of the budget as this many images never overspends it."""
    return price_list(settings).price_at(settings.rekognition_billed_this_month + max(0, images - 1))


def paid_cost(settings: Settings, calls: int) -> float:
    """USD for ``calls`` Rekognition calls after the images already billed this month."""
    return price_list(settings).cost(calls, settings.rekognition_billed_this_month)


@dataclass
class VideoEstimate:
    """The videos of a source, counted apart from its images: Rekognition Video bills per minute
    of video, read from each container's header (never by decoding). Copies (the same ETag and
    size as a video listed before, or as one already recognized) cost nothing."""

    listed: int = 0
    total_bytes: int = 0
    already_done: int = 0
    copies: int = 0
    billable: int = 0  # distinct videos within Rekognition Video's limits: each one job
    billable_ms: int = 0  # their length
    probed_ms: int = 0  # the length of every video whose header was read (those over the limits too)
    unknown_length: int = 0  # of those, videos whose header gives no length (counted as 0 minutes)
    over_limits: Counter = field(default_factory=Counter)  # by code: failed before any call
    unreadable: Counter = field(default_factory=Counter)  # by code: not a video, broken
    _seen: set = field(default_factory=set, repr=False)

    @property
    def minutes(self) -> float:
        return self.billable_ms / 60_000

    def cost(self, price_per_minute: float) -> float:
        return self.minutes * price_per_minute

    def first_of_its_bytes(self, etag: str, size: int) -> bool:
        """Whether no video listed before had these bytes (remembered from now on)."""
        if (etag, size) in self._seen:
            return False
        self._seen.add((etag, size))
        return True


@dataclass
class Estimate:
    """What ``celebscan estimate`` reports about a source, before anything is written.

    Copies are found by ETag and size (an S3 ETag is the MD5 of a single-part upload's bytes):
    an object like one listed before, or like a picture already recognized, costs no call. To
    count distinct pictures, 8 bytes per object to scan are kept (0.8 GB for 100 million objects).
    """

    listed: int = 0
    total_bytes: int = 0
    already_done: int = 0
    converted: int = 0  # over the S3Object (or bytes) limit: read and re-encoded before the call
    refused: int = 0  # over CELEBSCAN_MAX_IMAGE_BYTES: failed without a call
    known_copies: int = 0  # copies of a picture already recognized: its result is copied
    videos: VideoEstimate = field(default_factory=VideoEstimate)
    _pictures: list = field(default_factory=list, repr=False)  # arrays of 8-byte digests of (etag, size)
    _chunk: list = field(default_factory=list, repr=False)

    @property
    def to_scan(self) -> int:
        return self.listed - self.already_done

    @property
    def distinct(self) -> int:
        """Distinct pictures to recognize (objects to scan that are not copies of another)."""
        import numpy as np

        self._flush()
        if len(self._pictures) > 1:
            self._pictures = [np.unique(np.concatenate(self._pictures))]
        return int(self._pictures[0].size) if self._pictures else 0

    @property
    def copies(self) -> int:
        """Objects to scan that are copies (of one listed before, or of a known picture): free."""
        return self.to_scan - self.refused - self.distinct

    @property
    def billable(self) -> int:
        """Calls the scan will make at most: one per distinct picture (refused objects unread)."""
        return self.distinct

    def add(
        self, size: int, *, done: bool, in_s3: bool, max_image_bytes: int, etag: str = "", known: bool = False
    ) -> None:
        """Count one listed object: already scanned, a copy of a known picture, or what the size
        limits will make of it."""
        self.listed += 1
        self.total_bytes += size
        if done:
            self.already_done += 1
        elif size > max_image_bytes:
            self.refused += 1
        elif known:
            self.known_copies += 1
        else:
            if size > (MAX_S3_OBJECT_BYTES if in_s3 else MAX_BYTES):
                self.converted += 1
            digest = hashlib.md5(f"{etag}:{size}".encode(), usedforsecurity=False).digest()
            self._chunk.append(int.from_bytes(digest[:8], "little"))
            if len(self._chunk) >= 100_000:
                self._flush()

    def _flush(self) -> None:
        import numpy as np

        if self._chunk:
            self._pictures.append(np.unique(np.array(self._chunk, dtype=np.uint64)))
            self._chunk = []
