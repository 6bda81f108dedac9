"""Run-length encoding in the Kaggle Carvana format (pixels numbered 1.. row-major)."""
import numpy as np
import pytest

from carvana_jax import rle


def reference_encode(mask: np.ndarray) -> str:
    """A plain Python loop over the row-major pixels: the definition, written out."""
    pairs = []
    start = None
    pixels = [int(v != 0) for row in mask.tolist() for v in row]
    for number, on in enumerate(pixels + [0], start=1):
        if on and start is None:
            start = number
        elif not on and start is not None:
            pairs += [start, number - start]
            start = None
    return " ".join(map(str, pairs))


def reference_decode(text: str, shape) -> np.ndarray:
    flat = [0] * (shape[0] * shape[1])
    values = [int(v) for v in text.split()]
    for start, length in zip(values[0::2], values[1::2]):
        for number in range(start, start + length):
            flat[number - 1] = 1
    return np.array(flat, np.uint8).reshape(shape)


def test_hand_worked_example():
    mask = np.array([[0, 1, 1, 0],
                     [0, 0, 0, 1],
                     [1, 1, 0, 1]], np.uint8)
    # Row-major pixel numbers: row 0 is 1..4, row 1 is 5..8, row 2 is 9..12.
    # Foreground: 2, 3 | 8 | 9, 10 | 12. Pixel 8 (end of row 1) runs on into 9 and 10 (start of
    # row 2): runs do not stop at row ends.
    expected = "2 2 8 3 12 1"
    assert rle.encode(mask) == expected
    decoded = rle.decode(expected, (3, 4))
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)


def test_any_nonzero_value_is_foreground():
    mask = np.array([[0, 255, 7], [0, 0, 1]], np.uint8)
    assert rle.encode(mask) == "2 2 6 1"
    assert rle.encode(mask.astype(bool)) == "2 2 6 1"


def test_column_major_would_differ():
    # Guards against a transposed (Fortran-order) implementation: this mask's runs differ by order.
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.uint8)
    assert rle.encode(mask) == "1 2"  # column-major would give "1 1 3 1"
    np.testing.assert_array_equal(rle.decode("1 2", (2, 3)), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (3, 5), (17, 13), (31, 2)])
def test_encode_matches_reference_loop_on_random_small_masks(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.05, 0.5, 0.95):
        for _ in range(20):
            mask = (rng.random(shape) < density).astype(np.uint8)
            text = rle.encode(mask)
            assert text == reference_encode(mask)
            np.testing.assert_array_equal(reference_decode(text, shape), mask)
            np.testing.assert_array_equal(rle.decode(text, shape), mask)


def blobby_mask(rng, shape):
    """Large blobs (long runs, many crossing row ends) plus salt noise (many short runs)."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = np.zeros(shape, bool)
    for _ in range(5):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(0.05, 0.4) * h, rng.uniform(0.05, 0.4) * w
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    mask ^= rng.random(shape) < 0.01
    return mask.astype(np.uint8)


def test_round_trip_full_size():
    rng = np.random.default_rng(0)
    shape = rle.FULL_SHAPE
    assert shape == (1280, 1918)
    mask = blobby_mask(rng, shape)
    mask[0, 0] = 1  # first pixel
    mask[-1, -1] = 1  # last pixel
    text = rle.encode(mask)
    assert text.startswith("1 ")
    decoded = rle.decode(text)  # FULL_SHAPE is the default
    assert decoded.shape == shape and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, mask)
    values = np.array(text.split(), np.int64)
    starts, lengths = values[0::2], values[1::2]
    assert starts[-1] + lengths[-1] - 1 == shape[0] * shape[1]
    assert np.all(starts[1:] > starts[:-1] + lengths[:-1])  # sorted, disjoint, not touching
    assert lengths.sum() == mask.sum()


def test_round_trip_dense_noise_full_size():
    mask = (np.random.default_rng(1).random(rle.FULL_SHAPE) < 0.5).astype(np.uint8)
    np.testing.assert_array_equal(rle.decode(rle.encode(mask)), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 1918), (1280, 1), (3, 7), (101, 53), (640, 959)])
def test_round_trip_odd_shapes(shape):
    rng = np.random.default_rng(shape[0] * 10_000 + shape[1])
    mask = (rng.random(shape) < 0.3).astype(np.uint8) if min(shape) < 3 else blobby_mask(rng, shape)
    np.testing.assert_array_equal(rle.decode(rle.encode(mask), shape), mask)


def test_empty_mask():
    assert rle.encode(np.zeros((4, 6), np.uint8)) == ""
    assert rle.encode(np.zeros(rle.FULL_SHAPE, np.uint8)) == ""
    for text in ("", "   "):
        decoded = rle.decode(text, (4, 6))
        assert decoded.shape == (4, 6) and decoded.dtype == np.uint8
        assert not decoded.any()


def test_full_mask():
    assert rle.encode(np.ones((4, 6), np.uint8)) == "1 24"
    n = rle.FULL_SHAPE[0] * rle.FULL_SHAPE[1]
    assert rle.encode(np.ones(rle.FULL_SHAPE, np.uint8)) == f"1 {n}"
    assert rle.decode(f"1 {n}").all()


def test_decode_reuses_out_buffer():
    shape = (5, 7)
    first = np.zeros(shape, np.uint8)
    first[1:4, 2:6] = 1
    second = np.zeros(shape, np.uint8)
    second[0, :] = 1
    second[4, 6] = 1
    out = np.full(shape, 9, np.uint8)  # garbage that must be cleared
    result = rle.decode(rle.encode(first), shape, out=out)
    assert np.shares_memory(result, out)
    np.testing.assert_array_equal(out, first)
    result = rle.decode(rle.encode(second), shape, out=out)  # nothing of `first` may remain
    np.testing.assert_array_equal(out, second)
    np.testing.assert_array_equal(result, second)
    rle.decode("", shape, out=out)
    assert not out.any()


@pytest.mark.parametrize("text", [
    "1",            # odd number of values
    "1 2 3",        # odd number of values
    "12 2",         # runs past the last pixel (3x4 has 12)
    "13 1",         # starts after the last pixel
    "0 1",          # pixel numbers start at 1
    "-2 3",         # negative start
    "3 0",          # empty run
    "3 -1",         # negative length
    "1 2 x 3",      # not a number
])
def test_malformed_rle_raises_value_error(text):
    with pytest.raises(ValueError):
        rle.decode(text, (3, 4))


def test_run_ending_exactly_at_last_pixel_is_fine():
    decoded = rle.decode("11 2", (3, 4))
    assert decoded[2, 2] == decoded[2, 3] == 1 and decoded.sum() == 2


# --- the fast encoder: bit-packed edges, against the definition and the textbook numpy version -----

def straightforward_encode(mask: np.ndarray) -> str:
    """The textbook numpy encoder: the baseline rle.encode is timed against, and a second reference."""
    pixels = np.concatenate([[0], (mask.reshape(-1) != 0).astype(np.uint8), [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def car_like_mask(seed: int = 0, shape=rle.FULL_SHAPE) -> np.ndarray:
    """A side view of a car at 1918×1280: body, cabin, wheels, ragged edges, windows (~30% foreground,
    ~1700 runs), as bench code would time it."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - 760) / 230.0) ** 2 + ((xx - 960) / 800.0) ** 4 < 1
    mask |= ((yy - 560) / 150.0) ** 2 + ((xx - 1000) / 420.0) ** 2 < 1
    for cx in (520, 1420):
        mask |= ((yy - 960) / 120.0) ** 2 + ((xx - cx) / 120.0) ** 2 < 1
    edge = mask ^ np.roll(mask, 1, axis=1)
    edge |= np.roll(edge, 1, axis=1) | np.roll(edge, -1, axis=1)
    mask = np.where(edge, rng.random(shape) < 0.5, mask)
    mask &= ~((yy > 450) & (yy < 560) & (xx > 720) & (xx < 1280) & ((xx // 180) % 2 == 0))
    return mask.astype(np.uint8)


@pytest.mark.parametrize("shape", [(3, 4), (1, 9), (2, 6)])
def test_encode_every_mask_of_a_few_pixels(shape):
    # Exhaustive: runs starting and ending at every bit of a byte, across the byte boundary, and in
    # the padded last byte.
    size = shape[0] * shape[1]
    bits = (np.arange(2 ** size)[:, None] >> np.arange(size)) & 1
    for row in bits:
        mask = row.reshape(shape).astype(np.uint8)
        assert rle.encode(mask) == reference_encode(mask)


def test_encode_matches_straightforward_numpy_on_car_masks():
    for seed in range(3):
        mask = car_like_mask(seed)
        text = rle.encode(mask)
        assert text == straightforward_encode(mask)
        assert 1000 < len(text.split()) // 2 and 0.2 < mask.mean() < 0.4


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.int32, np.int64, np.float32, np.float64])
def test_encode_any_dtype_nonzero_is_foreground(dtype):
    rng = np.random.default_rng(5)
    values = rng.integers(0, 3, (13, 11)) * rng.choice([-1, 1], (13, 11))  # 0, ±1, ±2
    mask = values.astype(dtype) * (0.5 if np.dtype(dtype).kind == "f" else 1)
    assert rle.encode(mask) == reference_encode(values != 0)


def test_encode_of_views_and_empty_shapes():
    mask = car_like_mask(1)
    for view in (mask[::2, ::3], mask.T, mask[100:900, 7:1500]):  # row-major order of the view
        assert rle.encode(view) == straightforward_encode(np.ascontiguousarray(view))
    assert rle.encode(np.zeros((0, 5), np.uint8)) == ""
    starts, lengths = rle.run_boundaries(mask)
    assert lengths.sum() == mask.sum() and rle.encode(mask).startswith(f"{starts[0]} {lengths[0]} ")


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 5), (8, 8), (17, 13), (640, 959), rle.FULL_SHAPE])
def test_encode_packed_equals_encode_whatever_the_padding_bits(shape):
    rng = np.random.default_rng(shape[0] + shape[1])
    for density in (0.0, 0.02, 0.5, 1.0):
        mask = (rng.random(shape) < density).astype(np.uint8)
        if min(shape) > 3 and 0 < density < 1:
            mask = blobby_mask(rng, shape)
        packed = np.packbits(mask.reshape(-1))
        assert rle.encode_packed(packed, shape) == rle.encode(mask)
        padding = 8 * packed.size - mask.size
        if padding:  # np.packbits writes zeros there; a device-side packer might not
            garbage = packed.copy()
            garbage[-1] |= (1 << padding) - 1
            assert rle.encode_packed(garbage, shape) == rle.encode(mask)


def test_encode_packed_rejects_a_wrong_size_or_dtype():
    packed = np.packbits(np.ones(12, np.uint8))
    with pytest.raises(ValueError, match="np.packbits of a 3x6 mask"):
        rle.encode_packed(packed, (3, 6))
    with pytest.raises(ValueError):
        rle.encode_packed(packed.astype(np.int32), (3, 4))
    assert rle.encode_packed(packed, (3, 4)) == "1 12"
