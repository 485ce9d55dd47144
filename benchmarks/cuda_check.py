"""Checks for a lent GPU: the batching engine's sampling inside captured CUDA graphs.

On the embedded model, on CUDA with graphs on (the default there):

- greedy streams from the batching engine equal the sequential engine's;
- a seed gives the same tokens alone and among concurrent requests;
- the same seed gives the same tokens as the sequential engine (eager code);
- sampled text differs from greedy text.

Prints one PASS/FAIL line per check and exits 1 on any failure.

    python benchmarks/cuda_check.py --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import sys


async def tokens(engine, request) -> tuple[int, ...]:  # engine types load late
    events = [event async for event in engine.generate(request)]
    return events[-1].token_ids


async def main(device: str) -> int:
    from entity_llm_server import EngineRequest, UnifiedLLMResource
    from entity_llm_server.engine import BatchingSettings, Sampling

    batching = UnifiedLLMResource(device=device, batching=BatchingSettings(max_batch_size=16, max_queue=0))
    sequential = UnifiedLLMResource(device=device, engine="sequential")
    cb, seq = batching.load_engine(), sequential.load_engine()
    await cb.start()
    await seq.start()
    prompts = ["def fibonacci(n):", "import os\n", "class Parser:", "for i in range("]

    def greedy(p: str) -> EngineRequest:
        return EngineRequest(p, max_new_tokens=32)

    def seeded(p: str, seed: int) -> EngineRequest:
        return EngineRequest(p, max_new_tokens=32, sampling=Sampling(temperature=0.9, top_k=50, top_p=0.95, seed=seed))

    results: list[tuple[str, bool]] = []
    cb_greedy = await asyncio.gather(*(tokens(cb, greedy(p)) for p in prompts))
    seq_greedy = [await tokens(seq, greedy(p)) for p in prompts]
    results.append(("greedy: batching (graphs) == sequential", cb_greedy == seq_greedy))
    alone = [await tokens(cb, seeded(p, 7)) for p in prompts]
    crowd = [seeded(p, 7) for p in prompts] + [seeded(p, 100 + i) for i, p in enumerate(prompts * 3)]
    together = (await asyncio.gather(*(tokens(cb, r) for r in crowd)))[: len(prompts)]
    results.append(("seed: alone == among 16 concurrent", alone == together))
    seq_seeded = [await tokens(seq, seeded(p, 7)) for p in prompts]
    results.append(("seed: batching (graphs) == sequential (eager)", alone == seq_seeded))
    results.append(("sampled != greedy", alone != cb_greedy))
    await cb.close()
    await seq.close()
    for name, ok in results:
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in results) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    sys.exit(asyncio.run(main(parser.parse_args().device)))
