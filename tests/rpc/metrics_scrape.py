"""Scrape a metrics endpoint over loopback HTTP and parse it with prometheus_client's own parser."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

#: ``{(sample name, frozenset of label pairs): value}``
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a loopback test URL
        assert response.status == 200
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}`` (labels exactly these), or None when absent."""
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, got), v in samples.items() if n == name and wanted <= got)


def wait_for_value(url: str, check: Callable[[Samples], bool], timeout_s: float = 10.0) -> Samples:
    """Scrape until ``check`` holds (AssertionError with the last scrape after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(url)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {sorted(samples.items())[:60]}")
        time.sleep(0.05)
