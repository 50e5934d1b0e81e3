"""KV of each layer's own shape (or none), and recurrent state slots beside it: handed out with a request's
blocks, zeroed, charged to the pool and given back; a state never absorbs the same tokens twice."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qllm_core import EngineConfig, SamplingParams
from qllm_core.cache import KVCache, KVLayout, LayerKV
from qllm_core.engine_core import EngineCore
from qllm_core.state_pool import LayerState, SlotCache, StateLayout, StateReplayError, StateShape
from tests.conftest import DEVICE, drain
from tests.qllm_core.models.tiny_families import save_checkpoint

CPU = torch.device("cpu")
# Layer 0: a Gated DeltaNet-like layer (conv and recurrent state, no KV); 1: full attention with wide heads;
# 2: sliding attention with narrower ones, values narrower than keys.
KV = (None, LayerKV(2, 16, 16), LayerKV(4, 8, 6))
STATE = StateLayout(
    (LayerState((StateShape((10, 4), torch.float32),), (StateShape((2, 8, 8), torch.float32),)), None, None)
)


def _pool(blocks: int = 16) -> KVCache:
    return KVCache.for_layout(KVLayout(KV, STATE), blocks, 4, torch.float32, CPU)


def test_each_layer_keeps_kv_of_its_own_shape_and_a_stateful_layer_none() -> None:
    kv = _pool()
    assert kv.k[0] is None and kv.v[0] is None
    assert kv.k[1] is not None and tuple(kv.k[1].shape) == (64, 2, 16)
    assert kv.v[2] is not None and tuple(kv.v[2].shape) == (64, 4, 6)


def test_a_request_gets_a_zeroed_state_slot_charged_in_blocks_and_gives_both_back() -> None:
    kv = _pool()
    state = kv.state
    assert state is not None
    # 168 floats of state against 4 tokens x (2*32 + 4*14) floats of KV per block: one block.
    assert state.block_cost == 1
    assert kv.extra_blocks("a", 5) == 2 + 1 and kv.request_blocks(5) == 2 + 1
    kv.allocate("a", 5)
    slot = state.slot("a")
    conv = state.conv[0][0]
    assert conv is not None
    conv[slot].fill_(7.0)
    assert kv.used_blocks == 3 and kv.extra_blocks("a", 8) == 0
    assert kv.free("a") == 3 and kv.used_blocks == 0
    kv.audit()
    kv.allocate("b", 1)  # the same slot again, zeroed
    assert state.slot("b") == slot and float(conv[slot].abs().sum()) == 0.0
    kv.audit()


def test_a_state_fed_tokens_it_already_holds_is_refused() -> None:
    """What replaying a request's tokens after giving up a suspended pass would do: it must be evicted."""
    kv = _pool()
    kv.allocate("a", 6)
    state = kv.state
    assert state is not None
    state.advance(0, [state.slot("a")], [0], [6])
    with pytest.raises(StateReplayError, match="holds 6 tokens but is fed from position 3"):
        state.advance(0, [state.slot("a")], [3], [3])
    kv.free("a")
    kv.allocate("a", 6)  # evicted and back: a fresh state, fed from position 0
    state.advance(0, [state.slot("a")], [0], [6])


def test_the_slot_cache_continues_a_conv_state_as_transformers_does() -> None:
    """First call: the inputs left-padded to the kernel; next: the kept columns then the new inputs."""
    kv = _pool()
    kv.allocate("a", 8)
    state = kv.state
    assert state is not None
    slots = [state.slot("a")]
    first = SlotCache(state, slots, fresh=True)
    assert first.get_conv_state(0) is None and first.get_recurrent_state(0) is None
    x = torch.arange(20.0).view(1, 10, 2)
    full = first.update_conv_state(x, 0)
    assert torch.equal(full[..., -2:], x) and float(full[..., :2].abs().sum()) == 0.0
    first.commit()
    second = SlotCache(state, slots, fresh=False)
    kept = second.get_conv_state(0)
    assert kept is not None and torch.equal(kept[..., -2:], x)
    y = torch.ones(1, 10, 1)
    assert torch.equal(second.update_conv_state(y, 0)[..., -1:], y)


def test_requests_evicted_for_memory_restart_from_a_fresh_state_and_give_transformers_tokens(
    tmp_path: Path, reference: Callable[..., list[int]]
) -> None:
    """Qwen3-Next in a pool too small for its two BE prompts and an LS one: memory relief evicts BE requests
    (a queued one, or a suspended pass's), their state slots go back, and they recompute from position 0."""
    path = save_checkpoint("qwen3_next", tmp_path)
    config = EngineConfig(
        model=str(path),
        dtype="float64",
        device=DEVICE,
        policy="qllm",
        granularity="layer",
        kv_cache_tokens=192,
        block_size=4,
        chunk_tokens=8,
    )
    core = EngineCore(config)
    evicted: list[str] = []
    evict = core.memory.evict
    core.memory.evict = lambda request: evicted.append(request.request_id) or evict(request)  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=8, temperature=0.0)
    prompts = {"be0": list(range(20, 80)), "be1": list(range(100, 300, 3)), "ls": [5, 17, 99, 250, 3, 3, 42]}
    core.add_request("be0", prompts["be0"], params, "be")
    core.add_request("be1", prompts["be1"], params, "be")
    for _ in range(6):
        core.step()
    core.add_request("ls", prompts["ls"], params, "ls")
    finals = drain(core)
    assert evicted, "the pool must be too small for all three"
    for rid, prompt in prompts.items():
        assert list(finals[rid].token_ids) == reference(path, torch.float64, prompt, 8), rid
    core.kv.audit()
    assert core.kv.used_blocks == 0
