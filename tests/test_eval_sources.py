"""Eval data from real photographs through every source (folder, WebDataset, ArrayRecord, TFDS, CSV, JSONL), caption
lists, bad records, multi-caption retrieval against a loop reference, and the config errors of the new sources."""
import json
import os
import zlib

import numpy as np
import pytest
from PIL import Image

import photos
from jmm.errors import ConfigError
from jmm.evaluators import common, retrieval, zeroshot

RES = 24
N = len(photos.PHOTOS)


@pytest.fixture(scope='module')
def real_photos():
  """scikit-image's sample photographs (the `test` extras install it); skips where it is not installed."""
  pytest.importorskip('skimage')
  missing = [p.file for p in photos.PHOTOS if not os.path.exists(os.path.join(photos.data_dir(), p.file))]
  assert not missing, f'this scikit-image does not ship {missing} in {photos.data_dir()}'


@pytest.fixture(scope='module')
def photo_data(real_photos, tmp_path_factory):
  """The photos in every layout: {name: (data dict, label_key)}."""
  d = tmp_path_factory.mktemp('photos')
  root = photos.write_folder(d / 'folder')
  rel = [f'{p.cls}/{p.file}' for p in photos.PHOTOS]
  os.makedirs(d / 'lists')
  # The JSONL lists its images relative to image_root, except the first, given by its absolute path.
  jsonl_paths = [os.path.join(root, rel[0])] + rel[1:]
  sources = {
      'folder': (dict(name='folder', path=root), 'label'),
      'webdataset': (dict(name='webdataset', paths=photos.write_webdataset(d / 'photos.tar'),
                          captions_key='json/captions'), 'cls'),
      'array_record': (dict(name='array_record', paths=photos.write_array_record(d / 'photos.array_record'),
                            captions_key='captions'), 'label'),
      'csv': (dict(name='captions_file', path=photos.write_csv(d / 'photos.csv', [f'folder/{r}' for r in rel])),
              'label'),
      'jsonl': (dict(name='captions_file', path=photos.write_jsonl(d / 'lists' / 'photos.jsonl', jsonl_paths),
                     image_root=root), 'label'),
  }
  try:
    import tensorflow_datasets  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    sources['tfds'] = (dict(name='tfds', tfds_name=photos.write_tfds(d / 'tfds'), data_dir=str(d / 'tfds'),
                            captions_key='captions/text'), 'label')
  except ImportError:
    pass
  return {name: (dict(data, resolution=RES), label_key) for name, (data, label_key) in sources.items()}


def match(images, reference, tolerance=0.0):
  """The index of the reference image each image is (smallest mean absolute difference, at most `tolerance`)."""
  diff = np.abs(images[:, None].astype(np.float32) - reference[None].astype(np.float32)).mean(axis=(2, 3, 4))
  order = np.argmin(diff, axis=1)
  assert np.all(diff[np.arange(len(images)), order] <= tolerance), diff[np.arange(len(images)), order]
  return order


def test_every_source_gives_the_same_photos_labels_and_captions(photo_data):
  modes = {Image.open(os.path.join(photos.data_dir(), p.file)).mode for p in photos.PHOTOS}
  formats = {Image.open(os.path.join(photos.data_dir(), p.file)).format for p in photos.PHOTOS}
  assert modes == {'RGB', 'L', 'RGBA'} and formats == {'PNG', 'JPEG'}  # The premise: real, varied files.
  reference = photos.reference_images(RES)
  grey = [i for i, p in enumerate(photos.PHOTOS) if p.file in ('camera.png', 'moon.png')]
  assert all(np.array_equal(reference[i][..., 0], reference[i][..., c]) for i in grey for c in (1, 2))
  horse = [p.file for p in photos.PHOTOS].index('horse.png')  # RGBA: the colour channels, alpha dropped.
  rgb = Image.open(os.path.join(photos.data_dir(), 'horse.png')).convert('RGB').resize((RES, RES), Image.BICUBIC)
  np.testing.assert_array_equal(reference[horse], np.asarray(rgb))
  assert set(photo_data) >= {'folder', 'webdataset', 'array_record', 'csv', 'jsonl'}
  for name, (data, label_key) in photo_data.items():
    fields = ('image', 'label') if name == 'folder' else ('image', 'label', 'caption', 'captions')
    got = common.load_data(data, fields=fields, label_key=label_key)
    assert got['image'].shape == (N, RES, RES, 3) and got['image'].dtype == np.uint8, name
    assert got['bad_records'] == 0, name
    if name == 'tfds':  # TFDS decodes the images itself; a full decode as ours, so the same pixels.
      order = match(got['image'], reference)
    else:
      order = match(got['image'], reference)
      # The folder lists class by class (sorted names), file names sorted; the others keep the written order.
      written = list(range(N))
      if name == 'folder':
        written.sort(key=lambda i: (photos.PHOTOS[i].cls, photos.PHOTOS[i].file))
      assert list(order) == written, (name, order)
    assert sorted(order) == list(range(N)), name
    assert list(got['label']) == [photos.label(photos.PHOTOS[j]) for j in order], name
    if name != 'folder':
      assert got['captions'] == [list(photos.PHOTOS[j].captions) for j in order], name
      assert got['caption'] == [photos.PHOTOS[j].captions[0] for j in order], name
  assert common.known_class_names(photo_data['folder'][0]) == photos.CLASSES


def test_folder_skips_and_counts_unreadable_images(real_photos, tmp_path, caplog):
  small = [p for p in photos.PHOTOS if p.file in ('horse.png', 'moon.png', 'rocket.jpg')]
  root = photos.write_folder(tmp_path / 'photos', small)
  (tmp_path / 'photos' / 'space' / 'broken.jpg').write_bytes(photos.raw(small[-1])[:2000])  # A truncated JPEG.
  (tmp_path / 'photos' / 'animal' / 'empty.PNG').write_bytes(b'')
  (tmp_path / 'photos' / 'animal' / 'notes.txt').write_text('not an image: ignored, not counted')
  (tmp_path / 'photos' / '.cache').mkdir()  # Hidden: not a class.
  (tmp_path / 'photos' / 'zebra').mkdir()  # A class without images keeps its label.
  data = dict(name='folder', path=root, resolution=RES)
  assert common.known_class_names(data) == ['animal', 'space', 'vehicle', 'zebra']
  got = common.load_data(data, fields=('image', 'label'))
  assert got['bad_records'] == 2 and 'skipped 2 bad records' in caplog.text
  order = match(got['image'], photos.reference_images(RES, small))
  assert [small[j].file for j in order] == ['horse.png', 'moon.png', 'rocket.jpg']
  assert list(got['label']) == [0, 1, 2]
  with pytest.raises(ConfigError, match="data.name='folder' has no captions"):
    common.load_data(data, fields=('image', 'caption'))


def test_captions_file_groups_rows_and_counts_bad_rows(real_photos, tmp_path):
  cat, horse = [p for p in photos.PHOTOS if p.file in ('chelsea.png', 'horse.png')]
  photos.write_folder(tmp_path, [cat, horse])
  rows = ['image,caption,label', 'animal/chelsea.png,a cat,0', 'animal/horse.png,a horse,0',
          'animal/chelsea.png,"a cat, again",0', 'animal/missing.png,no such file,0', ',no image,0',
          'animal/horse.png,,0']
  (tmp_path / 'list.csv').write_text('\n'.join(rows) + '\n')
  data = dict(name='captions_file', path=str(tmp_path / 'list.csv'), resolution=RES)
  got = common.load_data(data, fields=('image', 'captions', 'label'))
  assert got['captions'] == [['a cat', 'a cat, again'], ['a horse']]  # Rows grouped by image, first-row order.
  assert got['bad_records'] == 3  # The missing image, the row without an image, the empty caption.
  lines = [json.dumps({'image': 'animal/horse.png', 'captions': ['a horse', ' ', 'a black horse']}), 'not json',
           json.dumps({'image': 'animal/chelsea.png', 'captions': 'one string'}), json.dumps([1, 2]),
           json.dumps({'image': 'animal/chelsea.png', 'captions': [3]})]
  (tmp_path / 'list.jsonl').write_text('\n'.join(lines) + '\n\n')
  got = common.load_data(dict(data, path=str(tmp_path / 'list.jsonl')), fields=('image', 'captions'))
  assert got['captions'] == [['a horse', 'a black horse'], ['one string']] and got['bad_records'] == 3
  order = match(got['image'], photos.reference_images(RES, [horse, cat]))
  assert list(order) == [0, 1]


# ----------------------------------------------------------------------------------------------------------
# Retrieval with several captions per image.
# ----------------------------------------------------------------------------------------------------------
def loop_recall(sims, text_to_image, k):
  """(i2t, t2i) recall@k by counting, per query, the candidates ranked above its best match: those strictly more
  similar, and those exactly as similar with a lower index (recall_at_k's tie rule)."""
  n, m = sims.shape

  def rank(scores, own):
    return sum(1 for c in range(len(scores)) if scores[c] > scores[own] or (scores[c] == scores[own] and c < own))

  i2t = [min(rank(sims[i], j) for j in range(m) if text_to_image[j] == i) < k for i in range(n)]
  t2i = [rank(sims[:, j], text_to_image[j]) < k for j in range(m)]
  return float(np.mean(i2t)), float(np.mean(t2i))


def test_recall_with_caption_lists_duplicates_and_ties_matches_the_loop():
  rng = np.random.default_rng(0)
  per_image = [1, 3, 2, 4, 1, 2, 3]
  n = len(per_image)
  text_to_image = rng.permutation(np.repeat(np.arange(n), per_image))  # [16], not image-major
  # Small integer entries: similarities are exact integers, so equal scores are exact ties.
  images = rng.integers(0, 3, (n, 5)).astype(np.float32)
  images[5] = images[2]  # A duplicate image.
  texts = rng.integers(0, 3, (len(text_to_image), 5)).astype(np.float32)
  other = next(j for j in range(len(texts)) if text_to_image[j] != text_to_image[4])
  texts[other] = texts[4]  # A duplicate caption of another image.
  sims = images @ texts.T
  assert any(len(set(row)) < len(row) for row in sims)  # Ties do occur.
  metrics = retrieval.recall_at_k(images, texts, text_to_image, ks=(1, 2, 3, 5))
  for k in (1, 2, 3, 5):
    assert (metrics[f'i2t_r{k}'], metrics[f't2i_r{k}']) == pytest.approx(loop_recall(sims, text_to_image, k)), k


class HashTokenizer:
  """Word ids by hash (pad 0, eos 1), right-padded int32 [n, max_len]: no vocabulary to build."""
  vocab_size = 4096

  def encode(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.replace('.', ' ').split()] + [1]
      out[row, :min(len(ids), max_len)] = ids[:max_len]
    return out


PROJECTION = np.random.default_rng(1).normal(size=(RES * RES * 3, 8)).astype(np.float32)


def embed_images(images):
  """A fixed random projection of the pixels, row by row (so a row's embedding does not depend on its batch)."""
  return common.l2_normalise([image.reshape(-1) @ PROJECTION for image in np.asarray(images, np.float32)])


def embed_texts(tokens):
  """Hashed bag of words in 8 dimensions: collisions and the shared caption give exact ties."""
  out = np.zeros((len(tokens), 8), np.float32)
  for row, ids in enumerate(tokens):
    for t in ids[ids > 1]:
      out[row, t % 8] += 1.0
  return common.l2_normalise(out)


def test_retrieval_on_photo_caption_lists_matches_the_loop(photo_data):
  tokenizer, text_len = HashTokenizer(), 16
  texts = [c for p in photos.PHOTOS for c in p.captions]
  text_to_image = np.repeat(np.arange(N), [len(p.captions) for p in photos.PHOTOS])
  image_emb = embed_images(common.images_to_float(photos.reference_images(RES)))
  sims = image_emb @ embed_texts(tokenizer.encode(texts, text_len)).T
  expected = {}
  for k in (1, 2, 5):
    expected[f'i2t_r{k}'], expected[f't2i_r{k}'] = loop_recall(sims, text_to_image, k)
  assert 0 < expected['i2t_r1'] < 1 and 0 < expected['t2i_r1'] < 1  # Not trivially perfect or hopeless.
  for name in ('csv', 'jsonl', 'webdataset', 'array_record'):
    config = dict(type='retrieval', data=photo_data[name][0], batch_size=4, text_len=text_len, ks=(1, 2, 5))
    retrieval.validate(config)
    assert retrieval.evaluate(embed_images, embed_texts, tokenizer, config) == pytest.approx(expected), name
  # One caption per image: caption lists of one (captions_key naming the caption member) give the numbers of
  # the one-caption path, which is recall_at_k over (image i, caption i).
  one = dict(type='retrieval', data=dict(photo_data['webdataset'][0], captions_key=None), batch_size=4,
             text_len=text_len, ks=(1, 2, 5))
  firsts = [p.captions[0] for p in photos.PHOTOS]
  direct = retrieval.recall_at_k(image_emb, embed_texts(tokenizer.encode(firsts, text_len)), np.arange(N), (1, 2, 5))
  assert retrieval.evaluate(embed_images, embed_texts, tokenizer, one) == pytest.approx(direct)
  assert retrieval.evaluate(embed_images, embed_texts, tokenizer, dict(one, captions_key='txt')) == pytest.approx(
      direct)


def test_zeroshot_on_the_photo_folder_with_its_own_class_names(photo_data):
  tokenizer = HashTokenizer()
  reference = photos.reference_images(RES)
  wrong = {'horse.png': 'drink'}  # The image tower takes the horse silhouette for a drink.
  classes = [photos.CLASSES.index(wrong.get(p.file, p.cls)) for p in photos.PHOTOS]
  class_of_token = {int(tokenizer.encode([c], 2)[0, 0]): i for i, c in enumerate(photos.CLASSES)}

  def oracle_images(images):  # One-hot of the class it knows each photo by (found by its pixels).
    index = match(np.rint((np.asarray(images) + 1.0) * 127.5).astype(np.uint8), reference)
    return np.eye(len(photos.CLASSES))[[classes[i] for i in index]]

  def oracle_texts(tokens):  # One-hot of the class named in the prompt.
    return np.eye(len(photos.CLASSES))[[next(class_of_token[t] for t in row if t in class_of_token)
                                        for row in tokens]]

  config = dict(type='zeroshot', data=photo_data['folder'][0], templates=['a photo of a {}.'], ks=(1, 2),
                batch_size=4, text_len=8)  # No class_names: the folder's sub-folder names.
  zeroshot.validate(config)
  assert zeroshot.evaluate(oracle_images, oracle_texts, tokenizer, config) == pytest.approx(
      dict(top1=(N - 1) / N, top2=1.0))  # The horse's true class, 'animal' (id 0), wins the tie for second.


# ----------------------------------------------------------------------------------------------------------
# Config errors name the field.
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('module, data, extra, field', [
    (zeroshot, dict(name='folder'), {}, r'data\.path is empty'),
    (zeroshot, dict(name='folder', paths='DIR/flat'), {}, r'data\.path is empty.*data\.paths is for shard'),
    (zeroshot, dict(name='folder', path='DIR/flat'), {}, r'data\.path=.*has no class sub-folders'),
    (zeroshot, dict(name='folder', path='DIR/nowhere'), {}, r'data\.path=.*is not a directory'),
    (retrieval, dict(name='captions_file'), {}, r'data\.path is empty'),
    (retrieval, dict(name='captions_file', path='DIR/list.txt'), {}, r'data\.path=.*must end in'),
    (retrieval, dict(name='captions_file', path='DIR/missing.csv'), {}, r'data\.path=.*cannot read'),
    (retrieval, dict(name='captions_file', path='DIR/list.csv', caption_key='text'), {},
     r"data\.caption_key='text' is not a column"),
    (retrieval, dict(name='captions_file', path='DIR/list.csv'), dict(caption_key='text'),
     r"data\.caption_key='text' is not a column"),
    (retrieval, dict(name='captions_file', path='DIR/list.jsonl', image_key='file'), {},
     r"data\.image_key='file' is not a key"),
    (retrieval, dict(name='folder', path='DIR/classes', captions_key='captions'), {}, r'data\.captions_key'),
    (retrieval, dict(name='synthetic'), dict(captions_key=''), r'^config\.evals\.x\.captions_key must be'),
])
def test_new_sources_config_errors_name_the_field(tmp_path, module, data, extra, field):
  (tmp_path / 'flat').mkdir()
  (tmp_path / 'flat' / 'a.jpg').write_bytes(b'')  # Images but no class sub-folders.
  (tmp_path / 'classes' / 'cat').mkdir(parents=True)
  (tmp_path / 'list.csv').write_text('image,caption\na.jpg,a cat\n')
  (tmp_path / 'list.jsonl').write_text('{"image": "a.jpg", "captions": ["a cat"]}\n')
  data = {k: v.replace('DIR', str(tmp_path)) if isinstance(v, str) else v for k, v in data.items()}
  config = dict(type=module.__name__.split('.')[-1], data=data, **extra)
  with pytest.raises(ConfigError, match=rf'^config\.evals\.x\..*{field}' if field[0] != '^' else field):
    module.validate(config, prefix='config.evals.x.')
