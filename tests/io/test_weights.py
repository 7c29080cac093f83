"""The weights file: written in one stream in the safetensors format, its header read and checked
alone."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moekit.exceptions import DataError
from moekit.io.weights import (
    TensorEntry,
    check_weights_fit,
    read_weights_header,
    write_weights,
)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_what_write_weights_writes_safetensors_reads_bit_for_bit(tmp_path, gen, dtype):
    state = {"w_EDO": torch.randn(3, 2, 5, generator=gen).to(dtype),
             "scalar": torch.tensor(2.5, dtype=dtype), "empty_E0": torch.zeros(3, 0, dtype=dtype),
             "strided": torch.randn(4, 6, generator=gen).to(dtype).T}  # not contiguous
    path = tmp_path / "w.safetensors"
    write_weights(state, path)
    again = load_file(str(path))
    assert again.keys() == state.keys()
    assert all(torch.equal(again[k], v) and again[k].dtype == dtype for k, v in state.items())
    with safe_open(str(path), "pt") as file:
        assert file.metadata() is None
    assert {k: e.shape for k, e in read_weights_header(path).items()} == {
        k: tuple(v.shape) for k, v in state.items()}


def test_write_weights_refuses_a_non_float_tensor(tmp_path):
    with pytest.raises(TypeError, match=r"weight 'n' has dtype torch.int64; moekit saves floating"):
        write_weights({"n": torch.zeros(2, dtype=torch.int64)}, tmp_path / "w.safetensors")


def test_the_header_of_a_file_safetensors_wrote_is_read(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"b": torch.zeros(2), "a": torch.ones(3, 4)}, str(path), metadata={"k": "v"})
    entries = read_weights_header(path)
    assert entries["a"].shape == (3, 4) and entries["a"].dtype == "F32"
    assert entries["a"].end - entries["a"].begin == 48  # 12 values * 4 bytes
    assert set(entries) == {"a", "b"}  # __metadata__ is not a tensor


def test_a_header_entry_without_offsets_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    header = json.dumps({"a": {"dtype": "F32", "shape": [2]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(DataError, match=r"tensor 'a' has shape \[2\] \(a list\) and data_offsets "
                                        "null; both must be lists of integers >= 0"):
        read_weights_header(path)


def test_a_file_shorter_than_eight_bytes_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(DataError, match="it is 2 bytes long, shorter than any header"):
        read_weights_header(path)


def entry(*shape):
    n = 4 * torch.Size(shape).numel()
    return TensorEntry("F32", shape, 0, n)


def test_check_weights_fit_names_the_size_fields_and_both_counts(tmp_path):
    # the config asks for 2 * 1000 = 2000 values; the file holds 2 * 3 = 6 (24 bytes)
    with pytest.raises(DataError, match=r"\(config.json: in_features=2, n_experts=1,000\): the "
                                        r"config asks for 2,000 weight values \(8 kB in F32\), but "
                                        r"w.safetensors holds 6 \(24 B\)"):
        check_weights_fit(tmp_path / "w.safetensors", {"w": entry(2, 3)}, {"w": (2, 1000)},
                          {"in_features": 2, "n_experts": 1000})


def test_check_weights_fit_passes_weights_that_fit(tmp_path):
    check_weights_fit(tmp_path / "w.safetensors", {"w": entry(2, 3), "b": entry(3)},
                      {"b": (3,), "w": (2, 3)}, {"n": 3})
