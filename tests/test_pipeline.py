"""grain pipelines: determinism, batch layout across processes, micro-steps and workers, resuming,
and the two kinds of element (folder Records, TFDS example dicts)."""
import dataclasses
import os

import grain
import numpy as np
import pytest
from helpers import small_config, take

from carvana_jax import rle
from carvana_jax.data import augment, kaggle, pipeline


@pytest.fixture(scope="module")
def records(kaggle_dir):
    return kaggle.index_train(kaggle_dir)


def drain(ds):
    it = iter(ds)
    try:
        return list(it)
    finally:
        if hasattr(it, "close"):
            it.close()


def concat(batches, key):
    return np.concatenate([b[key] for b in batches])


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_batch_shapes_and_dtypes(kaggle_dir, records):
    config = small_config(kaggle_dir, image_size=(48, 80), batch_size=3)
    for batch in take(pipeline.train_dataset(records, config), 2):
        assert sorted(batch) == ["image", "mask"]
        assert batch["image"].shape == (3, 48, 80, 3) and batch["image"].dtype == np.uint8
        assert batch["mask"].shape == (3, 48, 80) and batch["mask"].dtype == np.uint8
        assert set(np.unique(batch["mask"]).tolist()) <= {0, 1} and batch["mask"].any()


def test_same_seed_same_batches_different_seed_different(kaggle_dir, records):
    first = take(pipeline.train_dataset(records, small_config(kaggle_dir, seed=7)), 3)
    again = take(pipeline.train_dataset(records, small_config(kaggle_dir, seed=7)), 3)
    assert_same_batches(first, again)
    other = take(pipeline.train_dataset(records, small_config(kaggle_dir, seed=8)), 3)
    for key in ("image", "mask"):
        assert not np.array_equal(concat(first, key), concat(other, key))
    # Within one stream the batches differ, too.
    assert not np.array_equal(first[0]["image"], first[1]["image"])


def test_augmentation_is_applied_and_seeded(kaggle_dir, records):
    """With augmentation off every draw is a photo exactly as load_pair gives it; with it on, not."""
    config = small_config(kaggle_dir)
    config.augment.enabled = False
    plain = {r.name: augment.load_pair(r.image_path, r.mask_path, (64, 96)) for r in records}
    batches = take(pipeline.train_dataset(records, config), 24)  # 96 draws: two epochs of 48

    def which(image):
        found = [name for name, (photo, _) in plain.items() if np.array_equal(photo, image)]
        assert len(found) == 1
        return found[0]

    drawn = [which(image) for b in batches for image in b["image"]]
    for step, b in enumerate(batches):
        for mask, name in zip(b["mask"], drawn[4 * step:4 * step + 4]):
            np.testing.assert_array_equal(mask, plain[name][1])
    epoch1, epoch2 = drawn[:48], drawn[48:]
    assert sorted(epoch1) == sorted(epoch2) == sorted(plain)  # each epoch sees each photo once
    assert epoch1 != epoch2  # reshuffled each epoch
    assert epoch1 != sorted(epoch1)  # and shuffled at all

    config.augment.enabled = True
    augmented = take(pipeline.train_dataset(records, config), 3)
    assert not any(np.array_equal(photo, image) for b in augmented for image in b["image"]
                   for photo, _ in plain.values())


def test_process_slices_concatenate_to_the_global_batch(kaggle_dir, records):
    config = small_config(kaggle_dir, batch_size=4)
    single = take(pipeline.train_dataset(records, config), 3)
    shares = [take(pipeline.train_dataset(records, config, process_index, 2), 3) for process_index in (0, 1)]
    for step, batch in enumerate(single):
        for key in ("image", "mask"):
            assert shares[0][step][key].shape[0] == 2
            joined = np.concatenate([shares[0][step][key], shares[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])
    with pytest.raises(ValueError, match="divisible"):
        pipeline.train_dataset(records, small_config(kaggle_dir, batch_size=5), 0, 2)


def test_micro_batches_are_consecutive_halves(kaggle_dir, records):
    full = take(pipeline.train_dataset(records, small_config(kaggle_dir, batch_size=4)), 3)
    halves = take(pipeline.train_dataset(records, small_config(kaggle_dir, batch_size=2)), 6)
    for step, batch in enumerate(full):
        for key in ("image", "mask"):
            np.testing.assert_array_equal(halves[2 * step][key], batch[key][:2])
            np.testing.assert_array_equal(halves[2 * step + 1][key], batch[key][2:])


# Each worker process costs a couple of seconds to start on a small machine: one of each kind of
# test runs in the quick suite, the multi-worker variants are marked slow.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("num_workers", [1, pytest.param(2, marks=SLOW)])
def test_worker_processes_give_the_same_batches(kaggle_dir, records, num_workers):
    """Workers must not change which elements make a batch (nor their order)."""
    in_process = take(pipeline.train_dataset(records, small_config(kaggle_dir)), 3)
    workers = take(pipeline.train_dataset(records, small_config(kaggle_dir, num_workers=num_workers)), 3)
    assert_same_batches(in_process, workers)
    if num_workers == 1:
        return  # one worker takes every element; the cut below only matters with several
    # Also this process's share of a two-process run.
    in_process = take(pipeline.train_dataset(records, small_config(kaggle_dir), 1, 2), 2)
    workers = take(pipeline.train_dataset(records, small_config(kaggle_dir, num_workers=num_workers), 1, 2), 2)
    assert_same_batches(in_process, workers)


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=SLOW), pytest.param(2, marks=SLOW)])
def test_iterator_state_resumes_at_the_same_batch(kaggle_dir, records, num_workers):
    config = small_config(kaggle_dir, num_workers=num_workers)
    it = iter(pipeline.train_dataset(records, config))
    first = [next(it) for _ in range(2)]
    state = it.get_state()
    reference = [next(it) for _ in range(3)]  # moves on; the state taken before must not
    if hasattr(it, "close"):
        it.close()
    resumed = iter(pipeline.train_dataset(records, config))
    resumed.set_state(state)
    try:
        assert_same_batches([next(resumed) for _ in range(3)], reference)
    finally:
        if hasattr(resumed, "close"):
            resumed.close()
    assert not np.array_equal(first[1]["image"], reference[0]["image"])


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=SLOW)])
def test_eval_dataset_yields_every_record_once_in_order(kaggle_dir, records, num_workers):
    subset = records[:11]
    config = small_config(kaggle_dir)
    batches = drain(pipeline.eval_dataset(subset, config, batch_size=4, num_workers=num_workers))
    assert [len(b["index"]) for b in batches] == [4, 4, 3]  # the last batch is kept, not dropped
    assert concat(batches, "index").tolist() == list(range(11))
    images, masks = concat(batches, "image"), concat(batches, "mask_full")
    assert images.shape == (11, 64, 96, 3) and images.dtype == np.uint8
    assert masks.shape == (11, 1280, 1918) and masks.dtype == np.uint8
    for i, r in enumerate(subset):
        photo, _ = augment.load_pair(r.image_path, None, (64, 96))
        np.testing.assert_array_equal(images[i], photo)  # no augmentation in evaluation
        np.testing.assert_array_equal(masks[i], augment.decode_mask(r.mask_path))


def test_eval_dataset_without_masks(kaggle_dir):
    test_records = kaggle.index_test(kaggle_dir)[:5]
    batches = list(pipeline.eval_dataset(test_records, small_config(kaggle_dir), batch_size=2, num_workers=0))
    assert all("mask_full" not in b for b in batches)
    assert concat(batches, "index").tolist() == list(range(5))


def test_no_records_is_a_clear_error(kaggle_dir):
    with pytest.raises(kaggle.DataError, match="no training images"):
        pipeline.train_dataset([], small_config(kaggle_dir))


# ------------------------------------------------------------------------------- sources

def as_dicts(records):
    """The TFDS form of each record: the files' bytes, the mask's RLE, '' / b'' where there is no mask."""
    out = []
    for r in records:
        with open(r.image_path, "rb") as f:
            image = f.read()
        mask = b""
        if r.mask_path is not None:
            with open(r.mask_path, "rb") as f:
                mask = f.read()
        text = rle.encode(augment.decode_mask(r.mask_path)) if r.mask_path else ""
        out.append({"name": r.name, "car_id": r.car_id, "angle": r.angle, "image": image, "mask": mask,
                    "mask_rle": text})
    return out


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=SLOW)])
def test_dict_elements_give_the_same_batches_as_records(kaggle_dir, records, num_workers):
    config = small_config(kaggle_dir, num_workers=num_workers)
    from_records = take(pipeline.train_dataset(records, config), 3)
    from_dicts = take(pipeline.train_dataset(as_dicts(records), config), 3)
    assert_same_batches(from_records, from_dicts)
    # Evaluation too, with and without masks.
    subset = records[:5]
    assert_same_batches(drain(pipeline.eval_dataset(subset, config, batch_size=2)),
                        drain(pipeline.eval_dataset(as_dicts(subset), config, batch_size=2)))
    tests = kaggle.index_test(kaggle_dir)[:3]
    assert_same_batches(drain(pipeline.eval_dataset(tests, config, batch_size=2)),
                        drain(pipeline.eval_dataset(as_dicts(tests), config, batch_size=2)))


def test_dict_elements_with_only_the_gif_or_only_the_rle(kaggle_dir, records):
    config = small_config(kaggle_dir)
    reference = take(pipeline.train_dataset(records, config), 2)
    dicts = as_dicts(records)
    gif_only = [{k: v for k, v in d.items() if k != "mask_rle"} for d in dicts]
    rle_only = [dict(d, mask=b"") for d in dicts]
    assert_same_batches(take(pipeline.train_dataset(gif_only, config), 2), reference)
    assert_same_batches(take(pipeline.train_dataset(rle_only, config), 2), reference)


def test_masks_from_the_csv_equal_masks_from_the_gifs(kaggle_dir, records):
    """index_train attaches train_masks.csv's RLE; decoding it gives the same batches as the GIFs."""
    assert all(r.mask_rle for r in records)
    parts = pipeline.element_parts(records[0])
    assert parts.mask.rle == records[0].mask_rle and parts.mask.file == records[0].mask_path
    config = small_config(kaggle_dir)
    without = [dataclasses.replace(r, mask_rle=None) for r in records]
    assert_same_batches(take(pipeline.train_dataset(records, config), 3),
                        take(pipeline.train_dataset(without, config), 3))
    np.testing.assert_array_equal(
        drain(pipeline.eval_dataset(records[:2], config, batch_size=2))[0]["mask_full"],
        drain(pipeline.eval_dataset(without[:2], config, batch_size=2))[0]["mask_full"])


def test_bad_bytes_are_named_by_the_example(kaggle_dir, records):
    config = small_config(kaggle_dir, batch_size=1)
    bad = as_dicts(records[:1])
    bad[0]["image"] = bad[0]["image"][: len(bad[0]["image"]) // 2]
    with pytest.raises(kaggle.DataError, match=records[0].name):
        take(pipeline.train_dataset(bad, config), 1)
    bad = as_dicts(records[:1])
    bad[0].update(mask_rle="5 x")
    with pytest.raises(kaggle.DataError, match=f"{records[0].name}.*RLE"):
        take(pipeline.train_dataset(bad, config), 1)


class _WhoMapsIt(grain.transforms.Map):
    def map(self, x):
        import os
        import threading
        return {"x": np.int64(x), "pid": np.int64(os.getpid()), "thread": np.int64(threading.get_ident())}


@pytest.mark.parametrize("num_workers", [0, 1, pytest.param(2, marks=SLOW)])
def test_reading_threads(num_workers):
    """Workers map one element at a time (one reading thread each): grain's default of 16 threads in
    every worker made one worker 3x slower than none. In-process, one thread per CPU at most."""
    ds = pipeline.read_by_workers(grain.MapDataset.range(64).map(_WhoMapsIt()), num_workers, batch_size=4)
    items = drain(ds)
    assert [int(i["x"]) for i in items] == list(range(64))  # in order
    threads = {(int(i["pid"]), int(i["thread"])) for i in items}
    pids = {pid for pid, _ in threads}
    if num_workers == 0:
        assert pids == {os.getpid()} and 1 <= len(threads) <= min(os.cpu_count(), 16)
    else:
        assert len(pids) == num_workers and os.getpid() not in pids
        assert len(threads) == num_workers  # one thread in each worker
