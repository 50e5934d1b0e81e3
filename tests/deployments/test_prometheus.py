"""A real Prometheus server scrapes the running app's Ray metrics export; PromQL agrees with the client.

Debian's `prometheus` runs on loopback with a one-second scrape of this session's Ray node. Counters from
earlier tests in the session are already there, so every figure is a difference between the run's end
and its start, taken with PromQL's `@` modifier (exact; `increase()` would extrapolate).
"""

from __future__ import annotations

import asyncio
import functools
import math
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from ray import serve

from deployments.metrics import RAY_PREFIX, ROUTER_METRICS
from qllm_core.metrics import ENGINE_METRICS, LATENCY_BUCKETS, exported_names
from tests.deployments.conftest import _free_port
from tests.deployments.logs import serve_log_lines

pytestmark = pytest.mark.integration

TTFT = "ray_qllm_time_to_first_token_seconds_bucket"
LS, BE = "latency_sensitive", "best_effort"
LS_REQUESTS, BE_REQUESTS, LS_TOKENS, BE_TOKENS = 12, 6, 4, 24


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: `bash scripts/install.sh --dev` installs Debian's prometheus package")
    return path


@pytest.fixture(scope="module")
def prometheus(serve_app: str, ray_metrics_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus server on 127.0.0.1 scraping the session's Ray metrics port every second."""
    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{ray_metrics_port}']}}]\n"
    )
    port = _free_port()
    argv = [
        _binary("prometheus"),
        f"--config.file={config}",
        f"--storage.tsdb.path={root / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (root / "prometheus.log").open("w")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603 (fixed argv, no shell)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, root / "prometheus.log")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"prometheus was not ready in 60 s:\n{log.read_text()[-3000:]}")


def _query(url: str, promql: str, at: float) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql, "time": f"{at:.3f}"}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return list(body["data"]["result"])


def _scalar(url: str, promql: str, at: float) -> float:
    result = _query(url, promql, at)
    return 0.0 if not result else float(result[0]["value"][1])


def _summed_delta(selector: str, start: float, end: float) -> str:
    """PromQL for how much all series of `selector` grew together from `start` to `end`."""
    return f"sum({_delta(selector, start, end)})"


def _delta(selector: str, start: float, end: float) -> str:
    """PromQL for how much each series grew from `start` to `end`; a series born in between counts from 0."""
    return f"({selector} @ {end:.3f} - ({selector} @ {start:.3f} or {selector} @ {end:.3f} * 0))"


async def _one(client: openai.AsyncOpenAI, priority: str, max_tokens: int) -> tuple[float, int, str]:
    """TTFT as the client sees it, the completion tokens it was billed, and the request id."""
    start = time.monotonic()
    ttft, tokens, request_id = math.inf, -1, ""
    stream = await client.completions.create(
        model="qllm-tiny",
        prompt="metrics " * 12,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"priority": priority, "ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.choices and ttft == math.inf:
            ttft, request_id = time.monotonic() - start, chunk.id
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return ttft, tokens, request_id


async def _traffic(base: str) -> tuple[list[tuple[float, int, str]], list[int]]:
    async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120) as client:
        be = [asyncio.create_task(_one(client, "be", BE_TOKENS)) for _ in range(BE_REQUESTS)]
        ls = []
        for _ in range(LS_REQUESTS):
            ls.append(await _one(client, "ls", LS_TOKENS))
            await asyncio.sleep(0.05)
        be_done = await asyncio.gather(*be)
    return ls, [n for _, n, _ in be_done]


def _engines_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    router = serve.get_deployment_handle("PriorityRouter", app_name="qllm")
    while time.monotonic() < deadline:
        stats = router.stats.remote().result(timeout_s=30)
        busy = sum(o.load.in_flight for o in stats.replicas.values())
        if stats.replicas and busy == 0 and stats.be_held == 0:
            return
        time.sleep(0.5)
    raise AssertionError("the engines did not go idle")


def _wait_for(url: str, promql_at: Callable[[float], str], want: float, timeout: float = 45) -> float:
    """Poll until the query built for the current time reaches `want`; returns that time."""
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        now = time.time()
        got = _scalar(url, promql_at(now), now)
        if got == want:
            return now
        time.sleep(1)
    raise AssertionError(f"{promql_at(time.time())} stayed at {got}, expected {want}")


def _bucket_floor(seconds: float) -> float:
    return max((b for b in LATENCY_BUCKETS if b <= seconds), default=0.0)


def _bucket_ceiling(seconds: float) -> float:
    return min((b for b in LATENCY_BUCKETS if b >= seconds), default=math.inf)


def _scraped_after(url: str, moment: float, timeout: float = 60) -> float:
    """Wait for a successful scrape that began after `moment`; returns its timestamp."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        at = time.time()
        scraped = _scalar(url, 'timestamp(up{job="ray"} == 1)', at)
        if scraped > moment:
            return scraped
        time.sleep(0.5)
    raise AssertionError(f"no successful scrape of the Ray metrics port since {moment}")


def test_promql_over_the_run_agrees_with_the_client(serve_app: str, prometheus: str) -> None:
    _engines_idle()
    # The run starts at a scrape taken after earlier traffic was exported (Ray exports every second):
    # counters read "@ start" then hold everything before the run and nothing of it.
    start = _scraped_after(prometheus, time.time() + 2.0)
    ls, be_tokens = asyncio.run(_traffic(serve_app))
    ls_tokens = [n for _, n, _ in ls]
    assert ls_tokens == [LS_TOKENS] * LS_REQUESTS and be_tokens == [BE_TOKENS] * BE_REQUESTS

    app = 'application="qllm"'
    finished = f'ray_qllm_requests_finished_total{{{app}, finish_reason="length", priority_class="%s"}}'
    # Wait for the last request to be exported and scraped, then read everything at that one instant.
    try:
        _wait_for(prometheus, lambda now: f"sum({_delta(finished % BE, start, now)})", BE_REQUESTS)
    except AssertionError:
        now = time.time()
        series = {at: _query(prometheus, f"{finished % BE} @ {at:.3f}", now) for at in (start, now)}
        raise AssertionError(f"BE finished counters at start and now: {series}") from None
    # The router's counters come from another process than the engines', exported on its own clock: wait
    # for each, in turn, and read everything at the last of those instants (counters only grow after it).
    placed = f'ray_qllm_router_placements_total{{{app}, priority_class="%s"}}'
    end = start
    for selector, want in ((finished % LS, LS_REQUESTS), (placed % LS, LS_REQUESTS), (placed % BE, BE_REQUESTS)):
        end = _wait_for(prometheus, functools.partial(_summed_delta, selector, start), want)

    def delta_sum(selector: str, by: str = "") -> float:
        return _scalar(prometheus, f"sum{by}({_delta(selector, start, end)})", end)

    # Counters per class: exactly what the client saw.
    tokens = "ray_qllm_generation_tokens_total{%s, priority_class=%r}"
    assert delta_sum(tokens % (app, LS)) == sum(ls_tokens)
    assert delta_sum(tokens % (app, BE)) == sum(be_tokens)
    assert delta_sum(placed % LS) == LS_REQUESTS
    assert delta_sum(placed % BE) == BE_REQUESTS
    assert delta_sum(f'ray_qllm_time_to_first_token_seconds_count{{{app}, priority_class="{LS}"}}') == LS_REQUESTS

    # LS TTFT p99 over the run from the histogram buckets, against the client's own requests. The engine
    # starts its clock when a request reaches it, the client when it sends, so the client also reads each
    # request's engine-side TTFT from the request log (by the id it got back): the histogram's p99 must
    # fall in the bucket of the p99 of those, and no engine TTFT may exceed what the client saw.
    engine_ttft = {}
    for client_ttft, _, request_id in ls:
        (line,) = serve_log_lines("qllm", request_id)
        engine_ttft[request_id] = float(line.split("engine_ttft_ms=", 1)[1].split()[0]) / 1000
        assert engine_ttft[request_id] <= client_ttft, (line, client_ttft)
    buckets = _delta(f'{TTFT}{{{app}, priority_class="{LS}"}}', start, end)
    p99 = _scalar(prometheus, f"histogram_quantile(0.99, sum by (le) ({buckets}))", end)
    engine_p99 = sorted(engine_ttft.values())[math.ceil(0.99 * len(engine_ttft)) - 1]
    # (The log rounds to 0.1 ms, which may put a value on the other side of a bucket bound.)
    low, high = _bucket_floor(engine_p99 - 1e-4), _bucket_ceiling(engine_p99 + 1e-4)
    assert low <= p99 <= high, (p99, sorted(engine_ttft.values()))


def _ours(exposition: str) -> list[str]:
    """The lines of the exposition about qllm metrics (Ray's own metrics are not ours to lint)."""
    return [
        line
        for line in exposition.splitlines()
        if (line.split()[2] if line.startswith("# ") else line).startswith("ray_qllm_")
    ]


def test_exposition_passes_promtool_and_names_match_the_specs(serve_app: str, ray_metrics_port: int) -> None:
    httpx.post(f"{serve_app}/v1/completions", json={"prompt": "x", "max_tokens": 2, "priority": "be"}, timeout=60)
    wanted = {TTFT, "ray_qllm_requests_finished_total", "ray_qllm_router_placements_total", "ray_qllm_router_replicas"}
    deadline = time.monotonic() + 30
    while True:
        ours = _ours(httpx.get(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=10).text)
        names = {line.split("{", 1)[0].split(" ", 1)[0] for line in ours if not line.startswith("#")}
        if wanted <= names or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert wanted <= names, wanted - names
    expected = {RAY_PREFIX + n for n in exported_names(ENGINE_METRICS + ROUTER_METRICS)}
    assert names <= expected, names - expected
    # Ray stamps every series it exports (its own too) with camelCase identity labels (WorkerId, ...),
    # which promtool's lint flags; they are the only findings, and without them the exposition is clean.
    raw = _promtool_check(ours)
    assert raw.returncode != 0 or not raw.stderr.strip()
    findings = [line for line in raw.stderr.splitlines() if line.strip()]
    assert all("should be written in 'snake_case' not 'camelCase'" in line for line in findings), findings
    ray_identity = re.compile(r'\b(?:Component|NodeAddress|SessionName|Version|WorkerId)="[^"]*",?')
    clean = _promtool_check([ray_identity.sub("", line) for line in ours])
    assert clean.returncode == 0, clean.stdout + clean.stderr


def _promtool_check(lines: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603 (fixed argv, no shell)
        [_binary("promtool"), "check", "metrics"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
