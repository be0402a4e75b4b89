#!/usr/bin/env python3
"""Make the small GGUF fixtures that check gaia-inference's GGUF reader and dequantizer.

The reference is the PyPI `gguf` package (the one llama.cpp's own conversion scripts use): it
writes the files (`gguf.GGUFWriter`), quantizes where it can (`gguf.quants.quantize`) and
dequantizes every tensor (`gguf.quants.dequantize`). Our Rust reader must reproduce those f32
values bit for bit.

Outputs, under inference/tests/fixtures/quant/ (each a few KB):
  <type>.gguf   one tensor "w" of that ggml type (GGUF v3), plus a little metadata
  <type>.f32    the package's dequantization of "w", raw little-endian f32, row-major
  metadata.gguf every metadata value type incl. nested arrays, general.alignment = 64, several
                tensors (1-D, 2-D, 3-D) whose values are given by `metadata_tensor_values` below
  v2.gguf       q4_0.gguf with its version field set to 2 (v2 and v3 share the little-endian layout)

Run (from anywhere; the script finds the fixture folder from its own path):
  python3 -m venv /work/venv-ref && /work/venv-ref/bin/pip install numpy gguf
  /work/venv-ref/bin/python inference/tests/reference/make_quant_fixtures.py

The random generator is seeded, so a re-run with the same package version gives the same files.
"""

from __future__ import annotations

import pathlib
import struct

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

OUT = pathlib.Path(__file__).resolve().parent.parent / "fixtures" / "quant"

# (type, rows, cols, how): "quantize" uses gguf.quants.quantize on random normal data;
# "blocks" writes random but valid block bytes (the package cannot quantize K-quants).
CASES = [
    (T.F32, 3, 40, "quantize"),
    (T.F16, 3, 40, "quantize"),
    (T.BF16, 3, 40, "quantize"),
    (T.Q4_0, 3, 128, "quantize"),
    (T.Q4_1, 3, 128, "quantize"),
    (T.Q5_0, 3, 128, "quantize"),
    (T.Q5_1, 3, 128, "quantize"),
    (T.Q8_0, 3, 128, "quantize"),
    (T.Q2_K, 2, 512, "blocks"),
    (T.Q3_K, 2, 512, "blocks"),
    (T.Q4_K, 2, 512, "blocks"),
    (T.Q5_K, 2, 512, "blocks"),
    (T.Q6_K, 2, 512, "blocks"),
]


def f16_bytes(rng: np.random.Generator, n: int, lo: float, hi: float) -> np.ndarray:
    """n random float16 values in [lo, hi), as (n, 2) bytes."""
    return rng.uniform(lo, hi, size=n).astype(np.float16).view(np.uint8).reshape(n, 2)


def random_k_blocks(rng: np.random.Generator, qtype: T, n_blocks: int) -> np.ndarray:
    """Random valid super-blocks for a K-quant (field order as in ggml-common.h)."""

    def u8(k: int) -> np.ndarray:
        return rng.integers(0, 256, size=(n_blocks, k), dtype=np.uint8)

    if qtype == T.Q2_K:  # scales[16], qs[64], d, dmin
        parts = [u8(16), u8(64), f16_bytes(rng, n_blocks, 0.001, 0.05),
                 f16_bytes(rng, n_blocks, 0.001, 0.05)]
    elif qtype == T.Q3_K:  # hmask[32], qs[64], scales[12], d
        parts = [u8(32), u8(64), u8(12), f16_bytes(rng, n_blocks, -0.05, 0.05)]
    elif qtype == T.Q4_K:  # d, dmin, scales[12], qs[128]
        parts = [f16_bytes(rng, n_blocks, 0.001, 0.05), f16_bytes(rng, n_blocks, 0.001, 0.05),
                 u8(12), u8(128)]
    elif qtype == T.Q5_K:  # d, dmin, scales[12], qh[32], qs[128]
        parts = [f16_bytes(rng, n_blocks, 0.001, 0.05), f16_bytes(rng, n_blocks, 0.001, 0.05),
                 u8(12), u8(32), u8(128)]
    elif qtype == T.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        scales = rng.integers(-64, 64, size=(n_blocks, 16), dtype=np.int8).view(np.uint8)
        parts = [u8(128), u8(64), scales, f16_bytes(rng, n_blocks, -0.05, 0.05)]
    else:
        raise ValueError(f"no block generator for {qtype.name}")
    blocks = np.concatenate(parts, axis=1)
    assert blocks.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1], qtype.name
    return blocks


def write_type_fixture(rng: np.random.Generator, qtype: T, rows: int, cols: int, how: str) -> None:
    name = qtype.name.lower()
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if how == "quantize":
        data = rng.standard_normal(size=(rows, cols)).astype(np.float32)
        if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0):
            data[1, :block_size] = 0.0  # one all-zero block: d == 0 must dequantize to zeros
        q = gguf.quants.quantize(data, qtype)
    else:
        n_blocks = rows * cols // block_size
        q = random_k_blocks(rng, qtype, n_blocks).reshape(rows, cols // block_size * type_size)

    if qtype == T.F32:
        ref = q.astype(np.float32)
        raw = q
    elif qtype == T.F16:
        ref = gguf.quants.dequantize(q, qtype)
        raw = q
    else:
        raw = q.view(np.uint8) if q.dtype != np.uint8 else q
        ref = gguf.quants.dequantize(raw, qtype)
    ref = np.ascontiguousarray(ref, dtype=np.float32).reshape(rows, cols)

    w = gguf.GGUFWriter(str(OUT / f"{name}.gguf"), "test")
    w.add_uint32("test.rows", rows)
    w.add_uint32("test.cols", cols)
    w.add_string("test.type", qtype.name)
    if qtype in (T.F32, T.F16):
        w.add_tensor("w", raw)
    else:
        w.add_tensor("w", raw, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref.astype("<f4").tofile(OUT / f"{name}.f32")


def metadata_tensor_values() -> dict[str, np.ndarray]:
    """Deterministic tensor contents of metadata.gguf (the Rust test recomputes them)."""
    a = (np.arange(7, dtype=np.float32) * 0.5 - 1.0)  # 1-D, 7 elements
    b = (np.arange(2 * 3, dtype=np.float32) + 10.0).reshape(2, 3)  # GGUF dims [3, 2]
    c = (np.arange(2 * 3 * 4, dtype=np.float32) - 5.0).astype(np.float16).reshape(2, 3, 4)  # dims [4, 3, 2]
    return {"a": a, "b": b, "c": c}


def write_metadata_fixture() -> None:
    w = gguf.GGUFWriter(str(OUT / "metadata.gguf"), "test")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 60000)
    w.add_int16("t.i16", -30000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_uint64("t.u64", 18_000_000_000_000_000_000)
    w.add_int64("t.i64", -9_000_000_000_000_000_000)
    w.add_float32("t.f32", 1.5)
    w.add_float64("t.f64", -2.25)
    w.add_bool("t.bool_true", True)
    w.add_bool("t.bool_false", False)
    w.add_string("t.string", "héllo, gguf ✓")
    w.add_key_value("t.empty_string", "", V.STRING)  # add_string() skips empty strings
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "bc", ""])
    w.add_array("t.arr_f32", [0.5, -0.25])
    w.add_key_value("t.arr_u8", [1, 2, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("t.arr_bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_array("t.nested", [[1, 2], [3], [4, 5, 6]])
    w.add_array("t.nested_str", [["x", "y"], ["z"]])
    for name, t in metadata_tensor_values().items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_v2_fixture() -> None:
    data = bytearray((OUT / "q4_0.gguf").read_bytes())
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)
    (OUT / "v2.gguf").write_bytes(bytes(data))


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240607)
    for qtype, rows, cols, how in CASES:
        write_type_fixture(rng, qtype, rows, cols, how)
    write_metadata_fixture()
    write_v2_fixture()
    for p in sorted(OUT.iterdir()):
        print(f"{p.name:16} {p.stat().st_size:6} bytes")


if __name__ == "__main__":
    main()
