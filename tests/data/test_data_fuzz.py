"""Random and damaged bytes fed to the file readers: a DatasetError or correct data, never anything else."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sphereconv.data.checksums import read_content
from sphereconv.data.cifar import safe_load_pickle
from sphereconv.data.idx import parse_idx
from sphereconv.errors import DatasetError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_never_crash_the_idx_parser(data):
    try:
        array = parse_idx(data, "fuzz")
    except DatasetError:
        return
    # Accepted only if the header describes exactly the bytes that follow.
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    assert array.shape == dims and 4 + 4 * ndim + array.nbytes == len(data)


@FUZZ
@given(st.lists(st.integers(0, 255), min_size=1, max_size=40), st.integers(0, 60))
def test_every_truncation_of_an_idx_file_is_reported(values, cut):
    header = struct.pack(">HBBI", 0, 0x08, 1, len(values))
    content = header + bytes(values)
    cut = min(cut, len(content) - 1)
    try:
        parse_idx(content[:cut], "cut")
    except DatasetError:
        pass
    else:
        raise AssertionError(f"a file truncated to {cut} of {len(content)} bytes was accepted")
    assert parse_idx(content, "whole").tolist() == values


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_safe_unpickler(tmp_path, data):
    path = tmp_path / "batch"
    path.write_bytes(data)
    try:
        safe_load_pickle(path)
    except DatasetError:
        pass


@FUZZ
@given(st.integers(1, 400))
def test_truncated_pickles_and_gzip_streams_raise_dataset_error(tmp_path, cut):
    batch = pickle.dumps({b"data": np.arange(600, dtype=np.uint8).reshape(2, 300), b"labels": [1, 2]}, protocol=2)
    path = tmp_path / "batch"
    path.write_bytes(batch[: min(cut, len(batch) - 1)])
    try:
        safe_load_pickle(path)
    except DatasetError:
        pass
    else:
        raise AssertionError(f"a pickle truncated to {cut} bytes loaded")
    compressed = gzip.compress(bytes(range(256)) * 4)
    # From 2 bytes on the file carries the gzip magic; a shorter one is read raw and fails as IDX instead.
    path.write_bytes(compressed[: min(max(cut, 2), len(compressed) - 1)])
    try:
        read_content(path)
    except DatasetError:
        pass
    else:
        raise AssertionError(f"a gzip stream truncated to {cut} bytes was read")
