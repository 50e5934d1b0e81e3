"""`qllm-demo`: run a short mixed LS/BE workload on the engine and print what happened."""

from __future__ import annotations

import argparse
import asyncio
import time

from qllm_core.config import EngineConfig
from qllm_core.engine import Engine
from qllm_core.outputs import RequestOutput
from qllm_core.params import SamplingParams


async def _run(engine: Engine, requests: int, max_tokens: int) -> list[tuple[str, RequestOutput, float]]:
    async def one(i: int) -> tuple[str, RequestOutput, float]:
        cls = "ls" if i % 5 == 0 else "be"
        start = time.monotonic()
        final = None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(prompt=f"Request {i}: tell me about experts.", params=params, priority=cls):
            final = out
        assert final is not None  # noqa: S101 - generate always ends with a finished output
        return cls, final, time.monotonic() - start

    return await asyncio.gather(*(one(i) for i in range(requests)))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=EngineConfig.model, help="'tiny', 'bench' or a checkpoint directory")
    parser.add_argument("--policy", default=EngineConfig.policy, help="fcfs, priority, chunked or qllm")
    parser.add_argument("--granularity", default=EngineConfig.granularity, help="iteration, layer or expert")
    parser.add_argument("--device", default=EngineConfig.device)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    config = EngineConfig(model=args.model, policy=args.policy, granularity=args.granularity, device=args.device)
    engine = Engine(config)
    try:
        results = asyncio.run(_run(engine, args.requests, args.max_tokens))
    finally:
        engine.shutdown()
    for cls, out, seconds in results:
        print(f"{out.request_id[:12]} {cls} ttft={out.ttft_s:.3f}s total={seconds:.3f}s {out.text[:40]!r}")
    stats = engine.stats()
    print(f"passes={stats.passes_completed} preemptions={stats.preemptions} kv_used={stats.kv_used_blocks}")


if __name__ == "__main__":
    main()
