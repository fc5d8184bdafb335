"""Tests for the real-data sources (tar shards, ArrayRecord, TFDS), bad records, mixtures and resumption."""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from jmm import validation
from jmm.data import build as data_build
from jmm.data import array_record
from jmm.data import mixture
from jmm.data import pipeline
from jmm.data import tfds_source
from jmm.data import tokenizer as T
from jmm.data import transforms
from jmm.data import webdataset

TEXT_LEN = 8
RES = 16


def _image_bytes(i: int, fmt: str = 'JPEG') -> bytes:
  rng = np.random.default_rng(i)
  size = (int(rng.integers(18, 32)), int(rng.integers(18, 32)))  # Varied sizes and aspect ratios.
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(buf, fmt)
  return buf.getvalue()


def _caption(prefix: str, i: int) -> str:
  return f'{prefix} photo {i}'


def _write_tar(path, members) -> None:
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  sentences = [_caption(p, i) for p in ('wds', 'ar', 'tfds', 'img') for i in range(200)]
  return T.train_tokenizer(sentences, str(tmp_path_factory.mktemp('tok') / 'sp.model'), 48)


@pytest.fixture(scope='module')
def wds(tmp_path_factory):
  """Tar shards with planted damage; returns (pattern, good captions, bad records, bad shards)."""
  d = tmp_path_factory.mktemp('wds')
  good, i = [], 0
  # Shard 0: good JPEG and PNG examples (img2dataset's KEY.jpg/.txt/.json), a corrupt image, a missing caption,
  # an empty caption, and a key with a caption but no image.
  members = []
  for _ in range(9):
    ext, fmt = ('png', 'PNG') if i % 3 == 0 else ('jpg', 'JPEG')
    members += [(f'{i:06d}.{ext}', _image_bytes(i, fmt)), (f'{i:06d}.txt', _caption('wds', i).encode()),
                (f'{i:06d}.json', b'{"width": 20}')]
    good.append(_caption('wds', i))
    i += 1
  members += [('bad1.jpg', _image_bytes(99)[:40]), ('bad1.txt', b'wds corrupt')]  # Truncated JPEG data.
  members += [('bad2.jpg', b'not an image at all'), ('bad2.txt', b'wds garbage')]
  members += [('bad3.jpg', _image_bytes(98))]  # No caption.
  members += [('bad4.jpg', _image_bytes(97)), ('bad4.txt', b'  \n')]  # Empty caption.
  members += [('bad5.txt', b'wds no image')]
  _write_tar(d / 'shard-000.tar', members)
  # Shard 1: good examples, then a member cut off by the end of the file (a truncated download).
  members = []
  for _ in range(7):
    members += [(f'{i:06d}.txt', _caption('wds', i).encode()), (f'{i:06d}.jpg', _image_bytes(i))]
    good.append(_caption('wds', i))
    i += 1
  members += [('cut.txt', b'wds cut'), ('cut.jpg', _image_bytes(96))]
  _write_tar(d / 'shard-001.tar', members)
  raw = (d / 'shard-001.tar').read_bytes()
  cut_end = raw.rindex(_image_bytes(96)) + 100  # Inside the last image's data.
  (d / 'shard-001.tar').write_bytes(raw[:cut_end])
  (d / 'shard-002.tar').write_bytes(b'')  # Empty shard; shard-003 does not exist at all.
  return str(d / 'shard-{000..003}.tar'), good, 6, 2


@pytest.fixture(scope='module')
def ar_files(tmp_path_factory):
  """ArrayRecord files with planted damage; returns (glob, good captions, bad records, bad shards)."""
  d = tmp_path_factory.mktemp('ar')
  good, records = [], []
  for i in range(17):
    records.append(array_record.encode_record(_image_bytes(1000 + i), _caption('ar', i), key=str(i)))
    good.append(_caption('ar', i))
  records.insert(3, array_record.encode_record(_image_bytes(5)[:30], 'ar corrupt'))  # Truncated image.
  records.insert(7, array_record.encode_record(_image_bytes(6), ''))  # Missing caption.
  records.insert(9, b'\xc1 not msgpack')
  records.insert(12, array_record.msgpack.packb({'caption': 'ar no image'}))
  assert array_record.write_records(str(d / 'a-0.array_record'), records[:11]) == 11
  assert array_record.write_records(str(d / 'a-1.array_record'), records[11:]) == 10
  array_record.write_records(str(d / 'a-2.array_record'), [])  # Empty file.
  (d / 'a-3.array_record').write_bytes(b'garbage' * 10)  # Not an ArrayRecord file.
  return str(d / '*.array_record'), good, 4, 2


class _FakeTfds:
  """Stands in for `tfds.data_source(...)`: random access to decoded feature dicts, as TFDS returns them."""

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    image = np.random.default_rng(i).integers(0, 256, (20 + i % 5, 24, 3), dtype=np.uint8)
    caption = b'' if i == 4 else _caption('tfds', i).encode()
    return {'image': image, 'texts': {'caption': np.array([caption, b'second'], dtype=object)}}


def _iterate(sources, tok, transform=None, **kw):
  kw = {'batch_size': 4, 'text_len': TEXT_LEN, 'seed': 1, 'keep_captions': True, **kw}
  return pipeline.file_train_iterator(sources, tok, transform or transforms.ImageTransform(RES), **kw)


def _one_epoch_two_processes(source, tok, **kw):
  """Every caption delivered and the summed bad counts, over one epoch of 2 simulated processes."""
  captions, stats = [], {}
  for index in range(2):
    for batch in _iterate([source], tok, num_epochs=1, drop_remainder=False, shard_index=index, shard_count=2,
                          **kw):
      assert batch['image'].shape == (len(batch['caption']), RES, RES, 3)
      assert batch['text'].shape == (len(batch['caption']), TEXT_LEN) and batch['text'].dtype == np.int32
      captions += batch['caption']
      for k, v in batch['data_stats'].items():
        stats[k] = stats.get(k, 0) + v
  return captions, stats


def _assert_exactly_once(captions, good):
  assert len(captions) == len(set(captions)), 'a good example arrived twice'
  assert sorted(captions) == sorted(good)


def test_braces_and_patterns(tmp_path):
  assert webdataset.expand_braces('s-{008..011}.tar') == ['s-008.tar', 's-009.tar', 's-010.tar', 's-011.tar']
  assert webdataset.expand_braces('{a,b}/x{1..2}') == ['a/x1', 'a/x2', 'b/x1', 'b/x2']
  for name in ('x-1.tar', 'x-2.tar', 'y.tar'):
    (tmp_path / name).write_bytes(b'')
  assert webdataset.expand_paths(f'{tmp_path}/x-*.tar::{tmp_path}/y.tar') == [
      f'{tmp_path}/x-1.tar', f'{tmp_path}/x-2.tar', f'{tmp_path}/y.tar']
  with pytest.raises(FileNotFoundError, match=r'data.paths.*nothing-\*'):
    webdataset.expand_paths(f'{tmp_path}/nothing-*.tar')
  with pytest.raises(ValueError, match='no example in any'):  # Every shard empty: an error, not a stall.
    webdataset.WebDatasetSource(f'{tmp_path}/x-*.tar')


def test_webdataset_exactly_once_and_bad_counted(wds, tok):
  pattern, good, bad_records, bad_shards = wds
  source = webdataset.WebDatasetSource(pattern, name='laion')
  assert len(source) == len(good) + bad_records + bad_shards
  captions, stats = _one_epoch_two_processes(source, tok)
  _assert_exactly_once(captions, good)
  assert stats == {'bad_records/laion': bad_records, 'bad_shards/laion': bad_shards}
  assert source.captions(5) == good[:5]


def test_array_record_exactly_once_and_bad_counted(ar_files, tok):
  pattern, good, bad_records, bad_shards = ar_files
  source = array_record.ArrayRecordSource(pattern, name='cc')
  captions, stats = _one_epoch_two_processes(source, tok, transform=transforms.ImageTransform(RES, 'resize_crop'))
  _assert_exactly_once(captions, good)
  assert stats == {'bad_records/cc': bad_records, 'bad_shards/cc': bad_shards}


def test_tfds_source_with_mock(tok):
  source = tfds_source.TfdsSource('fake_captions', 'train', image_key='image', caption_key='texts/caption',
                                  data_source_fn=lambda name, split, data_dir: _FakeTfds(13))
  captions, stats = _one_epoch_two_processes(source, tok)
  _assert_exactly_once(captions, [_caption('tfds', i) for i in range(13) if i != 4])
  assert stats == {'bad_records/fake_captions': 1, 'bad_shards/fake_captions': 0}
  with pytest.raises(ValueError, match='tfds_name'):
    tfds_source.TfdsSource('nope', data_source_fn=lambda *a: (_ for _ in ()).throw(FileNotFoundError('x')))


def test_resume_is_exact_with_random_crops(wds, tok):
  source = webdataset.WebDatasetSource(wds[0])
  transform = transforms.ImageTransform(RES, 'random_resized_crop', crop_scale=(0.3, 1.0))
  it = _iterate([source], tok, transform)
  for _ in range(5):  # 20 examples: past the end of the first epoch (16 good).
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = _iterate([source], tok, transform)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(4)]):
    assert a['caption'] == b['caption'] and a['data_stats'] == b['data_stats']
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['text'], b['text'])


def test_each_epoch_crops_anew(wds, tok):
  source = webdataset.WebDatasetSource(wds[0])
  transform = transforms.ImageTransform(RES, 'random_resized_crop', crop_scale=(0.3, 1.0))
  it = _iterate([source], tok, transform, batch_size=len(wds[1]))  # One batch = one epoch's good examples.
  first, second = next(it), next(it)
  assert sorted(first['caption']) == sorted(second['caption']) == sorted(wds[1])
  crops = dict(zip(first['caption'], first['image']))
  assert all(not np.array_equal(crops[c], image) for c, image in zip(second['caption'], second['image']))


def test_mixture_weights_and_per_source_counts(wds, ar_files, tok):
  sources = [webdataset.WebDatasetSource(wds[0], name='laion'), array_record.ArrayRecordSource(ar_files[0],
                                                                                               name='cc')]
  it = _iterate(sources, tok, weights=[3.0, 1.0], batch_size=8)
  captions, stats = [], {}
  for _ in range(25):
    batch = next(it)
    captions += batch['caption']
    for k, v in batch['data_stats'].items():
      stats[k] = stats.get(k, 0) + v
  from_wds = sum(c.startswith('wds') for c in captions) / len(captions)
  assert 0.65 < from_wds < 0.85, from_wds  # Good examples only; bad records shift the split slightly.
  assert set(stats) == {'bad_records/laion', 'bad_shards/laion', 'bad_records/cc', 'bad_shards/cc'}
  assert all(stats[k] > 0 for k in stats)
  with pytest.raises(ValueError, match='num_epochs must be None'):
    _iterate(sources, tok, weights=[1, 1], num_epochs=1)


class _Planted:
  """An in-memory source whose first entries are planted bad ones ('record': an undecodable image, 'shard': a
  BadRecord(kind='shard') placeholder), then `good` good examples captioned '{prefix} photo {i}'."""

  def __init__(self, name, prefix, bad, good):
    self.name, self.prefix, self.bad, self.good = name, prefix, list(bad), good

  def __len__(self):
    return len(self.bad) + self.good

  def __getitem__(self, i):
    if i < len(self.bad):
      if self.bad[i] == 'shard':
        raise transforms.BadRecord(f'{self.name}: planted bad shard {i}', kind='shard')
      return {'image': b'not an image', 'caption': f'{self.prefix} broken {i}'}
    image = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    return {'image': image, 'caption': _caption(self.prefix, i)}


def test_mixture_counts_bad_records_per_source_exactly(tok):
  """Fails if a mixture's bad records or shards are counted under the wrong source or kind, lost or doubled."""
  # Unshuffled, the bad entries come first in each source, and neither source reaches its second epoch below:
  # the consumed part of each source holds exactly its planted bad entries, whatever the mixing order.
  sources = [_Planted('laion', 'wds', ['record', 'shard', 'record', 'record'], good=60),
             _Planted('cc', 'ar', ['shard', 'record', 'shard', 'shard', 'shard'], good=40)]
  it = _iterate(sources, tok, weights=[3.0, 1.0], batch_size=8, shuffle=False)
  captions, stats = [], {}
  for _ in range(5):
    batch = next(it)
    captions += batch['caption']
    for k, v in batch['data_stats'].items():
      stats[k] = stats.get(k, 0) + v
  from_wds = sum(c.startswith('wds') for c in captions)
  assert 0 < from_wds < 60 and 0 < len(captions) - from_wds < 40, from_wds  # The premise above.
  assert stats == {'bad_records/laion': 3, 'bad_shards/laion': 1, 'bad_records/cc': 1, 'bad_shards/cc': 4}


def test_all_bad_data_raises_instead_of_stalling(tmp_path, tok):
  _write_tar(tmp_path / 'bad.tar', [(f'{i}.jpg', b'garbage') for i in range(20)])
  it = _iterate([webdataset.WebDatasetSource(str(tmp_path / 'bad.tar'))], tok, max_consecutive_bad=10)
  with pytest.raises(RuntimeError, match='10 bad records in a row'):
    next(it)


def test_transform_modes_and_value_range():
  data = _image_bytes(3)
  rng = np.random.default_rng(0)
  for mode in transforms.MODES:
    out = transforms.ImageTransform(RES, mode)(data, rng)
    assert out.shape == (RES, RES, 3) and out.dtype == np.uint8
  # resize_crop of a 2:1 image keeps the centre square.
  wide = np.zeros((20, 40, 3), np.uint8)
  wide[:, 10:30] = 255
  out = transforms.ImageTransform(RES, 'resize_crop')(wide)
  assert out.min() >= 200  # Only the white centre (bicubic rings a little at its edges); no black.
  ones = transforms.to_value_range(np.array([0, 255], np.uint8), (0.0, 1.0))
  np.testing.assert_allclose(ones, [0.0, 1.0])
  np.testing.assert_allclose(transforms.to_value_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])
  for w, h in ((40, 20), (20, 40), (30, 30)):
    left, top, right, bottom = transforms.random_crop_box(w, h, rng, (0.08, 1.0))
    assert 0 <= left < right <= w and 0 <= top < bottom <= h


def _config(**data):
  from configs import siglip  # pylint: disable=g-import-not-at-top
  config = siglip.get_config(f"res=16,batch=8,data={data.get('name', 'synthetic')}")
  config.data.update(data)
  return config


def test_config_builds_and_validates_sources(wds, ar_files, tok, monkeypatch):
  config = _config(name='webdataset', paths=wds[0])
  validation.validate(config)
  it = data_build.make_train_iterator(config, tok, 4, 0, 1)
  batch = next(it)
  assert batch['image'].shape == (4, RES, RES, 3) and set(batch['data_stats']) == {
      'bad_records/webdataset', 'bad_shards/webdataset'}
  with pytest.raises(validation.ConfigError, match=r'data.paths.*nothing'):
    validation.validate(_config(name='webdataset', paths='/nonexistent/nothing-*.tar'))
  with pytest.raises(validation.ConfigError, match='data.paths is empty'):
    validation.validate(_config(name='array_record'))
  with pytest.raises(validation.ConfigError, match=r'mixture\[1\].type'):
    validation.validate(_config(name='mixture', mixture=[dict(name='a', type='array_record', weight=1.0,
                                                              paths=ar_files[0]),
                                                         dict(name='b', type='parquet', weight=1.0)]))
  config = _config(name='mixture', mixture=[
      dict(name='laion', type='webdataset', weight=1.0, paths=wds[0]),
      dict(name='cc', type='array_record', weight=1.0, paths=ar_files[0]),
      dict(name='fake', type='tfds', weight=1.0, tfds_name='fake', caption_key='texts/caption')])
  monkeypatch.setattr(tfds_source, '_tfds_data_source', lambda *a: _FakeTfds(13))
  validation.validate(config)
  source = data_build.make_source(config)
  assert isinstance(source, mixture.SourceMixture) and len(source.captions(30)) >= 27
  batch = next(data_build.make_train_iterator(config, tok, 8, 1, 2))
  assert batch['image'].shape == (8, RES, RES, 3) and len(batch['data_stats']) == 6


def test_worker_process_gives_the_same_batches(wds, tok):
  """Fails if a worker process changes the batches, or its state (batcher inside the worker) does not resume.

  One worker: with several, each batches its own share of the example stream (see file_train_iterator), so only
  one worker promises the in-process batches.
  """
  source = webdataset.WebDatasetSource(wds[0])
  expected = [next(it) for it in [_iterate([source], tok)] for _ in range(7)]  # 28 examples: past epoch 1 (16).
  it = _iterate([source], tok, worker_count=1)
  try:
    got = [next(it) for _ in range(3)]
    state = it.get_state()
  finally:
    it.close()
  assert state['worker_count'] == 1
  resumed = _iterate([source], tok, worker_count=1)
  try:
    resumed.set_state(state)
    got += [next(resumed) for _ in range(4)]
  finally:
    resumed.close()
  for a, b in zip(expected, got):
    assert a['caption'] == b['caption'] and a['data_stats'] == b['data_stats']
    np.testing.assert_array_equal(a['image'], b['image'])


def test_sources_pickle_for_workers(wds, ar_files):
  import pickle  # pylint: disable=g-import-not-at-top
  for source in (webdataset.WebDatasetSource(wds[0]), array_record.ArrayRecordSource(ar_files[0])):
    copy = pickle.loads(pickle.dumps(source))
    assert len(copy) == len(source) and copy[0]['caption'] == source[0]['caption']
    assert os.path.basename(copy.paths[0]) == os.path.basename(source.paths[0])


def test_resume_with_another_worker_count_is_a_clear_error(wds, tok):
  source = webdataset.WebDatasetSource(wds[0])
  it = _iterate([source], tok)
  next(it)
  state = it.get_state()
  assert state['worker_count'] == 0
  with pytest.raises(ValueError, match='worker_count=0; resume with that value, not 2'):
    _iterate([source], tok, worker_count=2).set_state(state)
  with pytest.raises(ValueError, match='not a file-source state'):
    _iterate([source], tok).set_state({'next_index': 3})


def test_tfds_data_source_end_to_end(tmp_path, tok):
  """A real (tiny) TFDS data set prepared in tmp_path, read through tfds.data_source with no download."""
  tfds = pytest.importorskip('tensorflow_datasets')

  class JmmTestTinyCaptions(tfds.core.GeneratorBasedBuilder):  # Registered as 'jmm_test_tiny_captions'.
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      # A zlib-encoded uint8 tensor, not tfds.features.Image: encoding PNGs would need TensorFlow.
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding='zlib'),
          'caption': tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i in range(10):
        image = np.random.default_rng(i).integers(0, 256, (18 + i, 20, 3), dtype=np.uint8)
        yield i, {'image': image, 'caption': _caption('tfds', i) if i != 7 else ''}

  JmmTestTinyCaptions(data_dir=str(tmp_path), file_format='array_record').download_and_prepare()
  source = tfds_source.TfdsSource('jmm_test_tiny_captions', 'train', data_dir=str(tmp_path))
  captions, stats = _one_epoch_two_processes(source, tok)
  _assert_exactly_once(captions, [_caption('tfds', i) for i in range(10) if i != 7])
  assert stats == {'bad_records/jmm_test_tiny_captions': 1, 'bad_shards/jmm_test_tiny_captions': 0}


def test_webdataset_through_fsspec_urls(wds, tmp_path):
  """Non-local paths go through fsspec: an in-memory file system stands in for gs:// or s3://."""
  fsspec = pytest.importorskip('fsspec')
  pattern, good = wds[0], wds[1]
  local = webdataset.WebDatasetSource(pattern)
  memory = fsspec.filesystem('memory')
  for path in local.paths[:2]:
    memory.pipe(f'/jmm-test/{os.path.basename(path)}', open(path, 'rb').read())
  remote = webdataset.WebDatasetSource('memory://jmm-test/shard-*.tar', name='remote')
  assert [p.split('/')[-1] for p in remote.paths] == ['shard-000.tar', 'shard-001.tar']
  assert all(p.startswith('memory://') for p in remote.paths)  # URLs stay URLs (fsspec's canonical form).
  # The same records as read locally (image decoding, where the corrupt ones fail, comes later).
  assert remote.captions(100) == local.captions(100) and set(good) <= set(remote.captions(100))
  assert remote[0]['image'] == local[0]['image']


@pytest.mark.parametrize('tar_format', [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_scan_tar_matches_tarfile(tmp_path, tar_format):
  """The header scan finds what Python's tarfile finds: names (long ones too), data offsets and sizes."""
  long_dir = 'd' * 60 + '/' + 'e' * 60  # Over 100 characters: ustar prefix, GNU 'L' or pax 'path' records.
  names = ['a.jpg', 'a.txt', f'{long_dir}/000001.jpg', f'{long_dir}/000001.txt']
  if tar_format != tarfile.USTAR_FORMAT:
    names.append('x' * 150 + '.txt')  # Needs a GNU long name or a pax header.
  path = tmp_path / 'f.tar'
  with tarfile.open(path, 'w', format=tar_format) as tar:
    for i, name in enumerate(names):
      info = tarfile.TarInfo(name)
      info.size = 100 * i + 1
      tar.addfile(info, io.BytesIO(b'z' * info.size))
  members, size, error = webdataset.scan_tar(str(path))
  with tarfile.open(path) as tar:
    expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
  assert error is None and size == os.path.getsize(path)
  assert members == expected and [m[0] for m in members] == names
  assert webdataset.split_key(f'{long_dir}/000001.jpg') == (f'{long_dir}/000001', 'jpg')


def test_index_cache_skips_the_scan(wds, tmp_path, monkeypatch):
  cache = tmp_path / 'index'
  first = webdataset.WebDatasetSource(wds[0], index_cache=str(cache))
  assert len(list(cache.glob('shard-00[01].tar.*.index.npz'))) == 2  # Damaged shards are not cached.

  def no_scan(path):
    assert path.endswith(('002.tar', '003.tar')), f'scanned {path} again'  # Only the damaged ones.
    return [], 0, 'empty'
  monkeypatch.setattr(webdataset, 'scan_tar', no_scan)
  second = webdataset.WebDatasetSource(wds[0], index_cache=str(cache))
  assert len(second) == len(first) and second.captions(100) == first.captions(100)
  np.testing.assert_array_equal(second._index, first._index)  # pylint: disable=protected-access
