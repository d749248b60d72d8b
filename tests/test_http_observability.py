"""What an operator sees of HTTP traffic: Prometheus counters and latencies by route pattern and the number of
requests in flight (always), one access-log line per request (only with http.access_log)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from gateway.runtime import Runtime


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text exposition, 0 when absent."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    return 0.0


async def get(rt: Runtime, path: str, **headers: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{rt.ports.http}{path}", headers=headers) as r:
            return r.status, await r.text()


async def test_requests_are_counted_and_timed_by_route(vna: Runtime) -> None:
    for _ in range(3):
        status, _ = await get(vna, "/dicomweb/studies", Accept="application/dicom+json")
        assert status in (200, 204)
    status, _ = await get(vna, "/dicomweb/studies/1.2.3/metadata", Accept="application/dicom+json")
    assert status == 404
    status, _ = await get(vna, "/no/such/path")
    assert status == 404
    _, text = await get(vna, "/metrics")
    assert sample(text, "vna_http_requests_total", route="/dicomweb/studies", method="GET", status="2xx") == 3
    assert sample(text, "vna_http_requests_total", route="/dicomweb/studies/{study}/metadata", method="GET",
                  status="4xx") == 1
    assert sample(text, "vna_http_requests_total", route="unmatched", method="GET", status="4xx") == 1
    assert sample(text, "vna_http_request_seconds_count", route="/dicomweb/studies") == 3
    assert sample(text, "vna_inflight_requests", protocol="http") == 1  # the /metrics request itself


@pytest.mark.parametrize("enabled", [False, True])
async def test_access_log_only_when_asked(vna_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture,
                                          enabled: bool) -> None:
    rt = await vna_factory(http={"access_log": enabled})
    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        for _ in range(2):
            assert (await get(rt, "/livez"))[0] == 200
    lines = [r for r in caplog.records if r.name == "aiohttp.access" and "/livez" in r.getMessage()]
    assert len(lines) == (2 if enabled else 0)
