"""Model families end to end (issue 13): models with sliding-window layers on a real
vLLM server with the connector, across a restart.

vLLM hands a block that left the window as its null block (id 0). cwm must never
capture it, store it under a real hash or write it back: a window holds only the
run of real blocks before its boundary, and a hit needs only the window's blocks.

Each test compares cwm's restore after a restart with vLLM's own prefix hit of the
same request on a server without the connector (the same compute shape: a hit of
the session's blocks, then the new tokens).
"""

from __future__ import annotations

import random
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from e2e_tools import BLOCK, EXTERNAL_HITS, outputs, server

from cwm_connector.control.client import ControlClient
from cwm_connector.demo.tiny_model import TinyModelSpec, build_tiny_model
from cwm_connector.demo.vllm_process import VllmServer
from cwm_connector.engine.hash_chain import block_hash_chain
from cwm_connector.engine.kv_groups import blocks_for_window
from cwm_connector.stats import read_stats

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

WINDOW = 64
SESSION_TOKENS = 1000
BRANCH_AT = 600
SALT = "sliding-session"
NO_HMA = ["--disable-hybrid-kv-cache-manager"]


def token_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(300, 3000) for _ in range(n)]


SESSION = token_ids(SESSION_TOKENS, seed=1)
NEXT_TURN = SESSION + token_ids(100, seed=2)
BRANCH = SESSION[:BRANCH_AT] + token_ids(200, seed=3)
CHAIN = block_hash_chain(SESSION, BLOCK, SALT, "sha256")
SESSION_BLOCKS = SESSION_TOKENS // BLOCK


@dataclass
class Family:
    model: Path
    store: Path
    root: Path
    reference: dict[str, Any]  # the next turn as vLLM's own prefix hit
    branch_hit: dict[str, Any]  # the branch as vLLM's own prefix hit
    branch_cold: dict[str, Any]
    window: dict[str, Any]
    stats: dict[str, Any]


def cached(resp: dict[str, Any]) -> int:
    return resp["usage"]["prompt_tokens_details"]["cached_tokens"]


def wait_for(pred: Any, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def stored_hashes(store: Path) -> set[bytes]:
    """Every block hash the catalog holds (any fingerprint)."""
    path = store / "catalog.sqlite"
    if not path.exists():
        return set()
    with sqlite3.connect(path) as db:
        return {bytes(r[0]) for r in db.execute("SELECT block_hash FROM blocks")}


def cwm_server(fam_root: Path, model: Path, store: Path, name: str, hma: bool) -> VllmServer:
    srv = server(model, store, fam_root, name)
    srv.extra_args = [] if hma else NO_HMA
    return srv


def capture_session(
    root: Path, spec: TinyModelSpec | Path, wanted: set[bytes], hma: bool = True
) -> Family:
    """vLLM alone answers the reference requests; then cwm captures and freezes the session.

    `spec`: a tiny Llama to build, or a model folder built already.
    """
    model = spec if isinstance(spec, Path) else build_tiny_model(root / "model", spec)
    plain_args = [] if hma else NO_HMA
    plain = VllmServer(str(model), root / "plain.log", extra_args=plain_args).start()
    try:
        plain.complete(SESSION, salt=SALT)
        reference = plain.complete(NEXT_TURN, salt=SALT)
        branch_hit = plain.complete(BRANCH, salt=SALT)
        branch_cold = plain.complete(BRANCH, salt="never-seen")
    finally:
        plain.stop()
    assert cached(reference) >= 30 * BLOCK and cached(branch_cold) == 0
    store = root / "store"
    a = cwm_server(root, model, store, "A", hma).start()
    try:
        a.complete(SESSION, salt=SALT)
        wait_for(lambda: wanted <= stored_hashes(store))
        window = ControlClient(store / "control.sock").call("freeze", salt=SALT, name="win")
        stats = ControlClient(store / "control.sock").call("stats")
    finally:
        a.stop()
    return Family(model, store, root, reference, branch_hit, branch_cold, window, stats)


def test_all_sliding_window_model_restores_losslessly_and_never_the_null_block(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    spec = TinyModelSpec(layer_types=("sliding_attention",) * 2, sliding_window=WINDOW)
    window_blocks = blocks_for_window(WINDOW, BLOCK)
    fam = capture_session(
        tmp_path_factory.mktemp("sliding"),
        spec,
        set(CHAIN[SESSION_BLOCKS - window_blocks : SESSION_BLOCKS]),
    )
    # The blocks that left the window were handed as the null block: none is in the
    # catalog, in any table.
    assert fam.stats["scheduler"]["null_blocks_skipped"] >= SESSION_BLOCKS - window_blocks - 2
    left_window = set(CHAIN[: SESSION_BLOCKS - window_blocks - 1])
    assert not left_window & stored_hashes(fam.store)
    with sqlite3.connect(fam.store / "catalog.sqlite") as db:
        (first_block,) = db.execute("SELECT first_block FROM windows WHERE name='win'").fetchone()
        in_window = [bytes(r[0]) for r in db.execute(
            "SELECT block_hash FROM window_blocks WHERE name='win' ORDER BY idx")]  # fmt: skip
        (groups,) = db.execute("SELECT fingerprint FROM windows WHERE name='win'").fetchone()
    assert not left_window & set(in_window)
    assert in_window == CHAIN[first_block : first_block + len(in_window)]
    assert first_block + len(in_window) >= SESSION_BLOCKS - 1 and len(in_window) >= window_blocks
    assert fam.window["blocks"] == len(in_window)
    assert '"kind":"sliding"' in groups and '"sliding_window":64' in groups

    b = server(fam.model, fam.store, fam.root, "B").start()
    try:
        thawed = ControlClient(fam.store / "control.sock").call("thaw", name="win")
        assert thawed["token_ids"][:SESSION_TOKENS] == SESSION
        restored = b.complete(NEXT_TURN, salt=SALT)
        hits = b.metric(EXTERNAL_HITS)
        assert hits == cached(fam.reference) >= 30 * BLOCK and cached(restored) == hits
        assert outputs(restored) == outputs(fam.reference)  # tokens and logprobs, exactly
        worker = read_stats(fam.store)
        assert worker["restore_verified_blocks"] == worker["loaded_blocks"] >= window_blocks
        assert worker.get("restore_mismatch_blocks", 0) == 0
        # A branch from the middle: its window's blocks were never stored, so it is a
        # correct recompute, as for vLLM alone.
        branch = b.complete(BRANCH, salt=SALT)
        assert b.metric(EXTERNAL_HITS) == hits and cached(branch) == 0
        assert outputs(branch)[0] == outputs(fam.branch_hit)[0] == outputs(fam.branch_cold)[0]
    finally:
        b.stop()


ALTERNATING = TinyModelSpec(
    layer_types=("sliding_attention", "full_attention"), sliding_window=WINDOW
)


def test_alternating_sliding_full_model_with_the_hybrid_allocator_off(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # --disable-hybrid-kv-cache-manager: the sliding layers keep full-attention KV,
    # one full group, every block real.
    fam = capture_session(
        tmp_path_factory.mktemp("alternating"), ALTERNATING, set(CHAIN[:SESSION_BLOCKS]),
        hma=False,
    )  # fmt: skip
    b = cwm_server(fam.root, fam.model, fam.store, "B", hma=False)
    b.env = {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache
    b.start()
    try:
        restored = b.complete(NEXT_TURN, salt=SALT)
        hits = b.metric(EXTERNAL_HITS)
        assert hits == SESSION_BLOCKS * BLOCK == cached(fam.reference) == cached(restored)
        assert outputs(restored) == outputs(fam.reference)
        # Every block is stored, so a branch from the middle is a hit from cwm too (once
        # vLLM's own cache no longer holds the blocks the next turn just restored).
        assert cached(fam.branch_hit) == (BRANCH_AT // BLOCK) * BLOCK
        requests.post(b.url + "/reset_prefix_cache", timeout=30).raise_for_status()
        branch = b.complete(BRANCH, salt=SALT)
        assert b.metric(EXTERNAL_HITS) == hits + (BRANCH_AT // BLOCK) * BLOCK
        assert outputs(branch) == outputs(fam.branch_hit)
        assert outputs(branch)[0] == outputs(fam.branch_cold)[0]
        assert read_stats(fam.store).get("restore_mismatch_blocks", 0) == 0
    finally:
        b.stop()


def blob_bytes(store: Path) -> int:
    with sqlite3.connect(store / "catalog.sqlite") as db:
        return int(db.execute("SELECT COALESCE(SUM(raw_bytes), 0) FROM blobs").fetchone()[0])


def test_alternating_model_with_the_hybrid_allocator_on(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # vLLM's default now that cwm declares SupportsHMA: a full and a sliding-window
    # group; the sliding layer keeps only its window, in vLLM and in cwm's store.
    root = tmp_path_factory.mktemp("hybrid")
    fam = capture_session(root, ALTERNATING, set(CHAIN[:SESSION_BLOCKS]))
    assert "Turning off hybrid kv cache manager" not in (root / "A.log").read_text()
    with sqlite3.connect(fam.store / "catalog.sqlite") as db:
        docs = [r[0] for r in db.execute("SELECT doc FROM fingerprints")]
    assert len(docs) == 2 and all('"kv_group"' in d for d in docs)  # one per group
    # The same session with the allocator off, in a store of its own: bytes per token.
    off_store = root / "store-off"
    off = cwm_server(root, fam.model, off_store, "off", hma=False).start()
    try:
        off.complete(SESSION, salt=SALT)
        wait_for(lambda: set(CHAIN[:SESSION_BLOCKS]) <= stored_hashes(off_store))
    finally:
        off.stop()
    on_bytes, off_bytes = blob_bytes(fam.store), blob_bytes(off_store)
    assert 0 < on_bytes < 0.6 * off_bytes, (on_bytes, off_bytes)

    assert fam.window["blocks"] == SESSION_BLOCKS + blocks_for_window(WINDOW, BLOCK)
    b = cwm_server(root, fam.model, fam.store, "B", hma=True).start()
    try:
        thawed = ControlClient(fam.store / "control.sock").call("thaw", name="win")
        assert thawed["blocks"] == fam.window["blocks"]
        restored = b.complete(NEXT_TURN, salt=SALT)
        hits = b.metric(EXTERNAL_HITS)
        assert hits == cached(fam.reference) == SESSION_BLOCKS * BLOCK == cached(restored)
        assert outputs(restored) == outputs(fam.reference)  # vLLM's own hit, allocator on
        control = ControlClient(fam.store / "control.sock")  # every group travels
        control.call("export", name="win", file=str(root / "win.cwm"))
        imported = control.call("import", file=str(root / "win.cwm"), name="win2")
        assert imported["blocks"] == fam.window["blocks"]
        worker = read_stats(fam.store)
        assert worker["restore_verified_blocks"] == worker["loaded_blocks"]
        assert worker.get("restore_mismatch_blocks", 0) == 0
        # Full group: every block before the boundary; sliding group: its window only.
        assert worker["loaded_blocks"] == SESSION_BLOCKS + blocks_for_window(WINDOW, BLOCK)
        # A branch from the middle: the sliding layer's window there was never stored.
        branch = b.complete(BRANCH, salt=SALT)
        assert b.metric(EXTERNAL_HITS) == hits
        assert outputs(branch)[0] == outputs(fam.branch_cold)[0]
    finally:
        b.stop()


def save_random_model(cls: Any, config: Any, out: Path, tokenizer_from: Path) -> Path:
    """Random bf16 weights of `cls(config)` (seed 0) and the tiny model's tokenizer."""
    import shutil

    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(out)
    for path in tokenizer_from.iterdir():
        if path.name.startswith(("token", "special")):
            shutil.copy(path, out / path.name)
    return out


def build_tiny_qwen3_next(out: Path, tokenizer_from: Path) -> Path:
    """A 2-layer random Qwen3-Next: one linear-attention (gated delta net) layer, one full."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    config = Qwen3NextConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
        linear_num_key_heads=1, linear_key_head_dim=64, linear_value_head_dim=64,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64,
        max_position_embeddings=8192, tie_word_embeddings=False,
    )  # fmt: skip
    return save_random_model(Qwen3NextForCausalLM, config, out, tokenizer_from)


def test_linear_attention_hybrid_starts_and_serves_with_cwm_inert(
    tiny_model: Path, tmp_path: Path
) -> None:
    # vLLM needs its hybrid allocator for Mamba/linear-attention hybrids; cwm declares
    # SupportsHMA, so configuring cwm never stops such a model. It has a state group cwm
    # does not restore: one start-up line says so, and nothing is captured.
    model = build_tiny_qwen3_next(tmp_path / "qwen3-next", tiny_model)
    prompt = token_ids(300, seed=5)
    plain = VllmServer(str(model), tmp_path / "plain.log")
    try:
        plain.start()
    except RuntimeError:  # this CPU's vLLM cannot run the model at all: cwm must not differ
        configured = server(model, tmp_path / "store", tmp_path, "cwm")
        with pytest.raises(RuntimeError):
            configured.start()
        assert "cwm" not in _root_cause(tmp_path / "cwm.log")
        return
    try:
        expected = plain.complete(prompt, salt="s")
    finally:
        plain.stop()
    srv = server(model, tmp_path / "store", tmp_path, "cwm").start()
    try:
        first = srv.complete(prompt, salt="s")
        second = srv.complete(prompt, salt="s")
        assert outputs(first)[0] == outputs(second)[0] == outputs(expected)[0]
        assert srv.metric(EXTERNAL_HITS) == 0
    finally:
        srv.stop()
    log = (tmp_path / "cwm.log").read_text()
    assert "KV-cache group (MambaSpec) is not restored" in log
    assert "Turning off hybrid kv cache manager" not in log
    assert stored_hashes(tmp_path / "store") == set()


def _root_cause(log: Path) -> str:
    lines = [line for line in log.read_text().splitlines() if "Error" in line]
    return lines[-1] if lines else ""


def build_tiny_deepseek_v2(out: Path, tokenizer_from: Path) -> Path:
    """A 2-layer random DeepSeek-V2 (MLA: 512 latent + 64 rope per token and layer)."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    config = DeepseekV2Config(
        vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=512, q_lora_rank=None,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
        first_k_dense_replace=2, max_position_embeddings=8192, tie_word_embeddings=False,
    )  # fmt: skip
    return save_random_model(DeepseekV2ForCausalLM, config, out, tokenizer_from)


def test_mla_model_restores_after_a_restart(tiny_model: Path, tmp_path: Path) -> None:
    # vLLM's CPU backend serves MLA with block size 16. On a processor without AMX it
    # turns its own prefix caching off (no prefix hit to compare with): the restore is
    # then checked by the digests of the scattered bytes and the tokens of a cold
    # prefill; with AMX also against vLLM's own prefix hit, exactly.
    model = build_tiny_deepseek_v2(tmp_path / "dsv2", tiny_model)
    prompt = token_ids(600, seed=6)
    store = tmp_path / "store"
    a = server(model, store, tmp_path, "A").start()
    try:
        cold = a.complete(prompt, salt="s")
        reference = a.complete(prompt, salt="s")  # vLLM's own prefix hit, where it caches
        wait_for(lambda: read_stats(store).get("captured_blocks", 0) >= 37)
    finally:
        a.stop()
    log = (tmp_path / "A.log").read_text()
    assert "Using CPU_MLA backend" in log
    vllm_caches = "prefix caching to be disabled" not in log
    b = server(model, store, tmp_path, "B").start()
    try:
        restored = b.complete(prompt, salt="s")
        assert b.metric(EXTERNAL_HITS) == cached(restored) == (len(prompt) - 1) // 16 * 16
        worker = read_stats(store)
        assert worker["restore_verified_blocks"] == worker["loaded_blocks"] == 37
        assert worker.get("restore_mismatch_blocks", 0) == 0
        tokens, logprobs, _ = outputs(restored)
        assert tokens == outputs(cold)[0]
        assert logprobs == pytest.approx(outputs(cold)[1], abs=0.05)
        if vllm_caches:
            assert outputs(restored) == outputs(reference)
    finally:
        b.stop()


def build_tiny_llama4(out: Path, tokenizer_from: Path) -> Path:
    """A 2-layer random Llama 4 text model: chunked-local attention (chunks of 128
    tokens, 4 blocks) in layer 0, full attention in layer 1, 2 experts."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=4096, hidden_size=128, intermediate_size=256, intermediate_size_mlp=256,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        num_local_experts=2, num_experts_per_tok=1, attention_chunk_size=128,
        interleave_moe_layer_step=1, no_rope_layers=[1, 0], max_position_embeddings=8192,
        tie_word_embeddings=False,
    )  # fmt: skip
    config.architectures = ["Llama4ForCausalLM"]
    return save_random_model(Llama4ForCausalLM, config, out, tokenizer_from)


def test_chunked_local_attention_model_restores_with_the_hybrid_allocator_on(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Llama 4's chunked-local layers attend within their 128-token chunk: a hit at block
    # boundary B needs only the blocks of B's chunk before B (none at a chunk boundary).
    root = tmp_path_factory.mktemp("chunked")
    model = build_tiny_llama4(root / "model", tiny_model)
    fam = capture_session(root, model, set(CHAIN[:SESSION_BLOCKS]))
    assert "is not restored" not in (root / "A.log").read_text()
    chunk_blocks = 128 // BLOCK
    assert fam.window["blocks"] == SESSION_BLOCKS + SESSION_BLOCKS % chunk_blocks
    b = cwm_server(root, model, fam.store, "B", hma=True)
    b.env = {"VLLM_SERVER_DEV_MODE": "1"}  # for /reset_prefix_cache
    b.start()
    try:
        ControlClient(fam.store / "control.sock").call("thaw", name="win")
        restored = b.complete(NEXT_TURN, salt=SALT)
        hits = b.metric(EXTERNAL_HITS)
        assert hits == cached(fam.reference) == SESSION_BLOCKS * BLOCK == cached(restored)
        assert outputs(restored) == outputs(fam.reference)  # vLLM's own prefix hit
        worker = read_stats(fam.store)
        assert worker["loaded_blocks"] == SESSION_BLOCKS + SESSION_BLOCKS % chunk_blocks
        assert worker["restore_verified_blocks"] == worker["loaded_blocks"]
        # A branch at 600 tokens: its chunk's blocks were never stored, but the chunk
        # boundary before it (block 16) needs none: a hit of 16 blocks, the rest computed.
        requests.post(b.url + "/reset_prefix_cache", timeout=30).raise_for_status()
        branch = b.complete(BRANCH, salt=SALT)
        boundary = BRANCH_AT // BLOCK // chunk_blocks * chunk_blocks
        assert b.metric(EXTERNAL_HITS) - hits == cached(branch) == boundary * BLOCK
        assert outputs(branch)[0] == outputs(fam.branch_cold)[0]
    finally:
        b.stop()
