"""Fingerprint: weights identity, hash-chain stability, stable ids."""

from __future__ import annotations

from pathlib import Path

from cwm_connector.engine.fingerprint import (
    canonical_id,
    differing_fields,
    hash_chain_stable,
    weights_identity,
)


def write_model(folder: Path, weights: bytes) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_weights_identity_changes_with_any_sampled_region(tmp_path: Path) -> None:
    size = 1 << 20
    base = bytes(size)
    model = write_model(tmp_path / "m", base)
    first = weights_identity(str(model))
    assert first["source"] == "local"
    assert weights_identity(str(model)) == first
    for offset in (10, size // 2, size - 10):  # header, middle and tail slices
        changed = bytearray(base)
        changed[offset] = 1
        write_model(model, bytes(changed))
        assert weights_identity(str(model)) != first
    write_model(model, base)
    (model / "config.json").write_text('{"hidden_size": 9}')
    assert weights_identity(str(model)) != first


def test_unknown_hub_model_is_named_not_guessed() -> None:
    ident = weights_identity("no-such-org/no-such-model-cwm-test")
    assert ident["source"] == "unknown"


def test_hash_chain_stability() -> None:
    assert hash_chain_stable("sha256", {})
    assert hash_chain_stable("sha256_cbor", {})
    assert not hash_chain_stable("xxhash", {})
    assert hash_chain_stable("xxhash", {"PYTHONHASHSEED": "0"})


def test_canonical_id_ignores_key_order_and_names_differences() -> None:
    a = {"model": "m", "block_size": 32, "dtype": "bfloat16"}
    b = {"dtype": "bfloat16", "model": "m", "block_size": 32}
    assert canonical_id(a) == canonical_id(b)
    c = {**a, "block_size": 64, "dtype": "float16"}
    assert canonical_id(a) != canonical_id(c)
    assert differing_fields(a, c) == ["block_size", "dtype"]
