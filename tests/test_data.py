"""Data pipeline: decoding and caching, column discovery, sharded epochs, on-device augmentation."""
import math

import datasets
import numpy as np
import pytest
import torch

from conftest import shared_dataset
from timm_asge.augment import augment_batch
from timm_asge.data import (
    ImageData, epoch_batches, epoch_indices, find_columns, image_loader, load_tensors, num_batches, split_train_val)


def test_find_columns_prefers_fine_label_and_names_missing_ones():
    features = datasets.Features({'img': datasets.Image(), 'coarse_label': datasets.ClassLabel(num_classes=20),
                                  'fine_label': datasets.ClassLabel(num_classes=100)})
    assert find_columns(features) == ('img', 'fine_label')
    assert find_columns(features, label_column='coarse_label') == ('img', 'coarse_label')
    with pytest.raises(ValueError, match=r"no image column 'image' \(columns: \['img', 'coarse_label', 'fine_label'\]"):
        find_columns(features, image_column='image')


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_epoch_shards_cover_every_sample_once(world_size):
    n = 12
    shards = [epoch_indices(n, epoch=4, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert sorted(torch.cat(shards).tolist()) == list(range(n))
    assert not torch.equal(epoch_indices(n, 4, 1), epoch_indices(n, 5, 1))  # reshuffled every epoch
    assert num_batches(n, 5, world_size) == len(list(epoch_batches(ImageData(torch.zeros(n, 1, 2, 2, dtype=torch.uint8),
                                                                                  torch.zeros(n, dtype=torch.long),
                                                                                  ['a']), 5, world_size=world_size)))


def test_uneven_shards_are_padded_like_distributed_sampler():
    shards = [epoch_indices(7, 0, 0, rank=r, world_size=2) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    assert set(torch.cat(shards).tolist()) == set(range(7))


def test_resume_mid_epoch_skips_exactly_the_trained_batches():
    data = ImageData(torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2).contiguous(),
                     torch.zeros(40, dtype=torch.long), ['a'])
    full = [labels for _, _, labels in epoch_batches(data, 8, epoch=2)]
    full_images = [images for _, images, _ in epoch_batches(data, 8, epoch=2)]
    resumed = [(index, images) for index, images, _ in epoch_batches(data, 8, epoch=2, start=3)]
    assert [index for index, _ in resumed] == [3, 4]
    assert all(torch.equal(a, b) for a, (_, b) in zip(full_images[3:], resumed))
    assert len(full) == 5


def test_split_train_val_is_seeded_and_disjoint():
    data = ImageData(torch.zeros(100, 1, 2, 2, dtype=torch.uint8), torch.arange(100) % 10, [str(i) for i in range(10)])
    train, val = split_train_val(data, 0.2, seed=0)
    again, _ = split_train_val(data, 20, seed=0)
    assert len(train) == 80 and len(val) == 20 and torch.equal(train.labels, again.labels)
    with pytest.raises(ValueError, match='leaves no training or no validation samples'):
        split_train_val(data, 100, seed=0)


def test_split_train_val_is_the_authors_random_split():
    """Their loaders: ``torch.manual_seed(42)``, then ``random_split(train_set, [50000, 10000])``."""
    data = ImageData(torch.zeros(600, 1, 1, 1, dtype=torch.uint8), torch.arange(600), [str(i) for i in range(600)])
    with torch.random.fork_rng():
        torch.manual_seed(42)
        authors_train, authors_val = torch.utils.data.random_split(range(600), [500, 100])
    train, val = split_train_val(data, 100, seed=42)
    assert train.labels.tolist() == list(authors_train) and val.labels.tolist() == list(authors_val)
    # Streamed data (data.in_memory: false) is split the same way, before decoding.
    rows = datasets.Dataset.from_dict({'label': list(range(600))})
    train_rows, val_rows = split_train_val(rows, 1 / 6, seed=42)
    assert train_rows['label'] == list(authors_train) and val_rows['label'] == list(authors_val)


def test_augmentation_is_per_sample_seeded_and_in_range():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(64, 3, 8, 8, generator=g)
    out = augment_batch(images, torch.Generator().manual_seed(5), crop_padding=2, hflip=True,
                        color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2)
    again = augment_batch(images, torch.Generator().manual_seed(5), crop_padding=2, hflip=True,
                          color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2)
    assert torch.equal(out, again) and out.shape == images.shape
    assert 0 <= out.min() and out.max() <= 1
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 3 <= grey.sum() <= 25  # p = 0.2 of 64 images


@pytest.mark.parametrize('strengths', [(0.4, 0.4, 0.4, 0.1), (1.5, 0.0, 0.8, 0.5), (0.0, 0.0, 0.0, 0.3)])
def test_colour_jitter_is_torchvisions_image_by_image(strengths):
    """Given the factors and the order it draws for each image, the jitter is torchvision's ColorJitter."""
    import torchvision.transforms.functional as TF
    images = torch.rand(192, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    images[0] = 0.5  # grey: no hue to turn
    out = augment_batch(images, torch.Generator().manual_seed(5), color_jitter=strengths)
    # The same draws, in augment_batch's order: 4 factors, then sort keys for the order of the ops that are on.
    ops = [k for k, strength in enumerate(strengths) if strength]
    draws = torch.rand(192, 4 + len(ops), generator=torch.Generator().manual_seed(5))
    low = torch.tensor([max(0.0, 1 - v) for v in strengths[:3]] + [-strengths[3]])
    high = torch.tensor([1 + v for v in strengths[:3]] + [strengths[3]])
    factors = draws[:, :4] * (high - low) + low
    orders = torch.tensor(ops)[draws[:, 4:].argsort(dim=1)].tolist()
    assert len({tuple(o) for o in orders}) == math.factorial(len(ops))  # every order occurs
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i, image in enumerate(images):
        want = image
        for k in orders[i]:
            want = adjust[k](want, factors[i, k].item())
        torch.testing.assert_close(out[i], want, atol=1e-5, rtol=0, msg=lambda m: f'image {i}, order {orders[i]}: {m}')
    assert out.min() >= 0 and out.max() <= 1


def test_colour_jitter_edges_are_torchvisions():
    """Factors at the ends of their ranges (0: black, grey, flat; hue +-0.5), in every order, on saturated pixels."""
    import itertools
    import torchvision.transforms.functional as TF
    from timm_asge.augment import _color_jitter
    image = torch.tensor([0.0, 1.0, 0.5, 1.0, 1.0, 0.2]).repeat(3, 2, 1)  # ties, 0s and 1s
    image[1, 1] = torch.tensor([1.0, 0.0, 0.2, 1.0, 0.3, 0.2])
    image[2, 0] = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.0, 1.0])
    adjust = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for factors in ([0.0, 0.0, 0.0, 0.5], [2.0, 1.4, 0.0, -0.5], [1.0, 3.0, 2.5, 0.25]):
        for order in itertools.permutations(range(4)):
            out = _color_jitter(image[None], torch.tensor([factors]), torch.tensor([order]), (0, 1, 2, 3))[0]
            want = image
            for k in order:
                want = adjust[k](want, factors[k])
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0, msg=lambda m: f'{factors} {order}: {m}')


def test_compiled_colour_jitter_matches_eager():
    """compile_jitter runs the jitter through torch.compile with the eager values, also on a short last batch."""
    import torch._dynamo.utils
    images = torch.rand(32, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    kwargs = dict(color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, hflip=True, crop_padding=2)
    frames = torch._dynamo.utils.counters['frames']['ok']
    for batch in (images, images[:7]):
        eager = augment_batch(batch, torch.Generator().manual_seed(5), **kwargs)
        compiled = augment_batch(batch, torch.Generator().manual_seed(5), compile_jitter=True, **kwargs)
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
    assert torch._dynamo.utils.counters['frames']['ok'] > frames  # dynamo compiled it


@pytest.mark.parametrize('bad', [(0.4, 0.4, 0.4), (0.4, -0.1, 0.4, 0.1), (0.4, 0.4, 0.4, 0.6), ('a', 1, 1, 1),
                                 (float('nan'), 0.4, 0.4, 0.1), (0.4, float('inf'), 0.4, 0.1), '0000',
                                 (True, 0.4, 0.4, 0.1)])
def test_colour_jitter_refuses_what_torchvision_refuses(bad):
    with pytest.raises(ValueError, match=r'must be \[brightness, contrast, saturation, hue\]'):
        augment_batch(torch.rand(2, 3, 4, 4), torch.Generator(), color_jitter=bad)


def test_crop_and_flip_move_pixels_as_documented():
    image = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4) / 16
    flipped = [augment_batch(image, torch.Generator().manual_seed(s), hflip=True) for s in range(20)]
    assert any(torch.equal(f, image.flip(-1)) for f in flipped) and any(torch.equal(f, image) for f in flipped)
    crops = [augment_batch(image, torch.Generator().manual_seed(s), crop_padding=1) for s in range(30)]
    # Every crop is the image shifted by at most one pixel with zeros coming in from the padding.
    for crop in crops:
        shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                  if torch.equal(crop, torch.roll(torch.nn.functional.pad(image, (1, 1, 1, 1)), (dy, dx), (2, 3))
                                 [..., 1:5, 1:5])]
        assert shifts, crop
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 3


def test_local_parquet_decode_and_cache(tmp_path):
    images = [np.full((6, 6, 3), 10 * i, dtype=np.uint8) for i in range(10)]
    ds = datasets.Dataset.from_dict({'img': images, 'label': [i % 2 for i in range(10)]},
                                    features=datasets.Features({'img': datasets.Image(),
                                                                'label': datasets.ClassLabel(names=['cat', 'dog'])}))
    folder = tmp_path / 'toy'
    ds.to_parquet(str(folder / 'train-00000-of-00001.parquet'))
    data = load_tensors(str(folder), 'train', img_size=6, channels=3, cache_dir=tmp_path / 'cache')
    assert data.images.shape == (10, 3, 6, 6) and data.images.dtype == torch.uint8
    assert data.images[3].unique().tolist() == [30] and data.label_names == ['cat', 'dog']
    assert len(list((tmp_path / 'cache').glob('*.safetensors'))) == 1
    cached = load_tensors(str(folder), 'train', img_size=6, channels=3, cache_dir=tmp_path / 'cache')
    assert torch.equal(cached.images, data.images) and cached.label_names == data.label_names
    grey = load_tensors(str(folder), 'train', img_size=12, channels=1, cache_dir=tmp_path / 'cache')
    assert grey.images.shape == (10, 1, 12, 12)
    # A replaced file is another source (new labels, other images); a cut-short cache entry is decoded again.
    ds.map(lambda row: {'label': 1}).to_parquet(str(folder / 'train-00000-of-00001.parquet'))
    relabelled = load_tensors(str(folder), 'train', img_size=6, channels=3, cache_dir=tmp_path / 'cache')
    assert relabelled.labels.tolist() == [1] * 10
    for entry in (tmp_path / 'cache').glob('*.safetensors'):
        entry.write_bytes(entry.read_bytes()[:50])
    again = load_tensors(str(folder), 'train', img_size=6, channels=3, cache_dir=tmp_path / 'cache')
    assert torch.equal(again.images, data.images) and again.labels.tolist() == [1] * 10
    # Unlabelled (-1), as some Hub test splits are.
    ds.map(lambda row: {'label': -1}).to_parquet(str(folder / 'test-00000-of-00001.parquet'))
    with pytest.raises(ValueError, match=r'labels outside \[0, 2\) \(min -1'):
        load_tensors(str(folder), 'test', img_size=6, channels=3, cache_dir=tmp_path / 'cache')


def test_local_imagefolder(tmp_path):
    from PIL import Image
    for split in ('train', 'test'):
        for value, name in ((0, 'cat'), (100, 'dog')):
            (tmp_path / 'pets' / split / name).mkdir(parents=True)
            Image.fromarray(np.full((4, 4), value, dtype=np.uint8)).save(tmp_path / 'pets' / split / name / '0.png')
    data = load_tensors(str(tmp_path / 'pets'), 'test', img_size=4, channels=3, cache_dir=tmp_path / 'cache')
    assert data.label_names == ['cat', 'dog'] and data.images.shape == (2, 3, 4, 4)
    assert [data.images[data.labels == k].unique().tolist() for k in (0, 1)] == [[0], [100]]


def test_streamed_batches_depend_on_seed_and_epoch_only():
    """Each image's crop and flip is seeded from (seed, epoch, image): the worker count and the global random state
    change nothing, a new epoch gives a new order and new crops, and evaluation has no randomness."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(12)]
    ds = datasets.Dataset.from_dict({'image': images, 'label': list(range(12))},
                                    features=datasets.Features({'image': datasets.Image(),
                                                                'label': datasets.ClassLabel(num_classes=12)}))

    def epoch(num_workers, epoch=0, train=True, seed=0):
        loader = image_loader(ds, 8, 1, batch_size=4, train=train, num_workers=num_workers, seed=seed)
        if train:
            loader.sampler.set_epoch(epoch)
        batches = list(loader)
        return torch.cat([b['image'] for b in batches]), torch.cat([b['label'] for b in batches])

    first, labels = epoch(0)
    assert sorted(labels.tolist()) == list(range(12)) and labels.tolist() != list(range(12))
    torch.manual_seed(123)  # the process's own random state is not the crops'
    for again in (epoch(0), epoch(2)):
        assert torch.equal(again[0], first) and torch.equal(again[1], labels)
    second, second_labels = epoch(0, epoch=1)
    assert second_labels.tolist() != labels.tolist()
    by_label = {int(y): x for x, y in zip(first, labels)}
    assert any(not torch.equal(x, by_label[int(y)]) for x, y in zip(second, second_labels))
    assert not torch.equal(epoch(0, seed=1)[0], first)
    # Seeds and epochs do not alias: seed 1's first epoch is not seed 0's second one.
    assert epoch(0, seed=1)[1].tolist() != second_labels.tolist()
    # A plain loop without set_epoch still gets a new order and new crops on each pass.
    loader = image_loader(ds, 8, 1, batch_size=4, train=True, num_workers=0)
    passes = [torch.cat([b['label'] for b in loader]) for _ in range(2)]
    assert passes[0].tolist() == labels.tolist() and passes[1].tolist() == second_labels.tolist()
    test, test_labels = epoch(0, train=False)
    assert test_labels.tolist() == list(range(12)) and torch.equal(epoch(2, train=False)[0], test)


def test_streamed_crops_leave_the_accelerators_random_state_alone(monkeypatch):
    """With num_workers=0 the crops are drawn in the training process: only its CPU generator is borrowed (and given
    back), never the GPU's, whose dropout draws a resumed run must repeat."""
    def reseeds_the_gpu(*args):
        raise AssertionError('the GPU generator was reseeded')
    torch.manual_seed(5)
    monkeypatch.setattr(torch.cuda, 'manual_seed_all', reseeds_the_gpu)
    monkeypatch.setattr(torch.cuda, 'manual_seed', reseeds_the_gpu)
    ds = datasets.Dataset.from_dict({'image': [np.zeros((12, 12), dtype=np.uint8)] * 4, 'label': [0, 1, 2, 3]},
                                    features=datasets.Features({'image': datasets.Image(),
                                                                'label': datasets.ClassLabel(num_classes=4)}))
    state = torch.get_rng_state()
    assert len(list(image_loader(ds, 8, 1, batch_size=2, train=True, num_workers=0))) == 2
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.shared_data
def test_mnist_copy_decodes_exactly():
    data = load_tensors(str(shared_dataset('mnist')), 'test', img_size=28, channels=1)
    assert data.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_unreadable_rows_and_empty_splits_are_named(tmp_path):
    import io

    from PIL import Image
    jpeg = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 50, dtype=np.uint8)).save(jpeg, format='JPEG')
    good = {'bytes': jpeg.getvalue(), 'path': None}
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.ClassLabel(names=['a', 'b'])})
    for name, bad in (('cut', {'bytes': jpeg.getvalue()[:60], 'path': None}), ('null', None)):
        rows = {'image': [good, good, good, bad], 'label': [0, 1, 0, 1]}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / name / 'train-0.parquet'))
        with pytest.raises(ValueError, match=r"row 3 of split 'train' of .*holds no readable image"):
            load_tensors(str(tmp_path / name), 'train', img_size=8, channels=3, cache_dir=tmp_path / 'cache')
    empty = datasets.Dataset.from_dict({'image': [good], 'label': [0]}, features=features)
    empty.to_parquet(str(tmp_path / 'empty' / 'train-0.parquet'))
    empty.select([]).to_parquet(str(tmp_path / 'empty' / 'test-0.parquet'))
    with pytest.raises(ValueError, match='empty split'):
        load_tensors(str(tmp_path / 'empty'), 'test', img_size=8, channels=3, cache_dir=tmp_path / 'cache')
