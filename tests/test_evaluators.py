"""Evaluators on constructed embeddings with known answers, plus evaluate() with fake towers and data."""
import inspect
import io
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jmm.errors import ConfigError
from jmm.evaluators import common, linear_probe, retrieval, synthetic_zeroshot, zeroshot

# ----------------------------------------------------------------------------------------------------------
# Fakes: 3 colours x 2 shapes, a word-level tokenizer, a source whose pixels encode the example.
# ----------------------------------------------------------------------------------------------------------
COLOURS, SHAPES = ('red', 'green', 'blue'), ('square', 'circle')
CLASS_NAMES = [f'{c} {s}' for c in COLOURS for s in SHAPES]
UNSEEN = {1, 4}  # 'red circle', 'blue square'.


class FakeTokenizer:
  """Word-level tokenizer with the spec's interface: pad 0, eos 1, right-padded int32 [n, max_len]."""

  def __init__(self, words):
    self.vocab = {w: i + 2 for i, w in enumerate(sorted(set(words)))}
    self.vocab_size = len(self.vocab) + 2

  def encode(self, texts, max_len):
    out = np.zeros((len(texts), max_len), np.int32)
    for row, text in enumerate(texts):
      ids = [self.vocab[w] for w in text.replace('.', ' ').split()] + [1]
      out[row, :min(len(ids), max_len)] = ids[:max_len]
    return out


class FakeSource:
  """Random-access source; image pixel (0, 0, 0) = label, (0, 0, 1) = index (mod 256)."""

  def __init__(self, split, num_examples, seed=0):
    rng = np.random.default_rng(seed + (split == 'test'))
    labels = rng.integers(0, len(CLASS_NAMES), num_examples)
    if split == 'train':  # Unseen pairs never occur in training, as in the synthetic data.
      labels = np.array([l if l not in UNSEEN else (l + 1) % len(CLASS_NAMES) for l in labels])
    self.labels = labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    label = int(self.labels[i])
    image = np.zeros((4, 4, 3), np.uint8)
    image[0, 0, 0], image[0, 0, 1] = label, i % 256
    return dict(image=image, caption=f'a {CLASS_NAMES[label]} number{i}', label=label, seen=label not in UNSEEN,
                colour=label // len(SHAPES), shape=label % len(SHAPES))


def pixel(images, channel):
  """Recovers the integer stored in pixel (0, 0, channel) of float images in [-1, 1]."""
  return np.rint((np.asarray(images)[:, 0, 0, channel] + 1.0) * 127.5).astype(int)


@pytest.fixture
def fake_data(monkeypatch):
  """Routes the evaluators' data access to FakeSource and the fake class names."""

  def fake_split(split, config, *, num_examples, max_objects=1):
    del max_objects
    return common.load_split(FakeSource(split, num_examples, common.get(config, 'seed', 0)), num_examples)

  monkeypatch.setattr(common, 'synthetic_split', fake_split)
  monkeypatch.setattr(common, 'synthetic_classes', lambda: (list(CLASS_NAMES), len(SHAPES)))
  words = ['a', 'small', 'large', 'in', 'the', 'centre', 'top', 'left', 'bottom', 'right', *COLOURS, *SHAPES]
  return FakeTokenizer(words + [f'number{i}' for i in range(64)])


# ----------------------------------------------------------------------------------------------------------
# common
# ----------------------------------------------------------------------------------------------------------
def test_embed_in_batches_pads_last_batch_and_trims():
  seen_shapes = []

  def fn(x):
    seen_shapes.append(x.shape)
    return x * 2.0

  array = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
  out = common.embed_in_batches(fn, array, batch_size=4)
  np.testing.assert_array_equal(out, array * 2.0)
  assert seen_shapes == [(4, 3)] * 3  # 10 rows -> 4 + 4 + (2 padded to 4); one shape for a jitted fn.
  assert common.embed_in_batches(fn, array[:3], batch_size=8).shape == (3, 3)


def test_load_split_and_image_range():
  data = common.load_split(FakeSource('test', 7), num_examples=5)
  assert data['image'].shape == (5, 4, 4, 3) and data['image'].dtype == np.uint8
  assert isinstance(data['caption'], list) and len(data['caption']) == 5
  assert data['label'].shape == (5,) and data['seen'].dtype == bool
  floats = common.images_to_float(np.array([0, 255], np.uint8))
  np.testing.assert_allclose(floats, [-1.0, 1.0])


# ----------------------------------------------------------------------------------------------------------
# zeroshot
# ----------------------------------------------------------------------------------------------------------
def test_class_embeddings_normalise_each_template_before_averaging():
  text_emb = np.array([[[3.0, 0.0], [0.0, 1.0]],  # Unequal norms: averaging raw vectors would favour x.
                       [[0.0, -2.0], [0.0, -5.0]]])  # [C=2, T=2, D=2]
  out = zeroshot.class_embeddings(text_emb)
  np.testing.assert_allclose(out, [[2 ** -0.5, 2 ** -0.5], [0.0, -1.0]], atol=1e-6)


def test_topk_accuracy():
  logits = np.array([[0.9, 0.5, 0.1], [0.2, 0.3, 0.8], [0.5, 0.5, 0.0]])
  labels = np.array([0, 1, 1])
  assert zeroshot.topk_accuracy(logits, labels, k=1) == pytest.approx(1 / 3)  # Row 3 ties -> lower id (0).
  assert zeroshot.topk_accuracy(logits, labels, k=2) == pytest.approx(1.0)


def test_synthetic_zeroshot_metrics_split_seen_and_unseen():
  class_emb = np.eye(len(CLASS_NAMES))
  labels = np.arange(len(CLASS_NAMES)).repeat(2)  # [12]
  seen = np.array([l not in UNSEEN for l in labels])
  # Seen pairs are recognised; unseen ones get the right colour but the other shape.
  pred = np.where(seen, labels, labels // 2 * 2 + (1 - labels % 2))
  metrics = synthetic_zeroshot.zeroshot_metrics(class_emb[pred], class_emb, labels, seen, num_shapes=len(SHAPES))
  assert metrics == pytest.approx(dict(top1=8 / 12, top1_seen=1.0, top1_unseen=0.0, colour_top1=1.0,
                                       shape_top1=8 / 12))
  np.testing.assert_array_equal(zeroshot.zeroshot_predictions(class_emb[pred], class_emb), pred)


def test_synthetic_zeroshot_evaluate_with_fake_towers(fake_data):
  tokenizer = fake_data
  class_of_word = {}
  for cls, name in enumerate(CLASS_NAMES):
    colour, shape = name.split()
    class_of_word[(tokenizer.vocab[colour], tokenizer.vocab[shape])] = cls

  def embed_images(images):  # One-hot of the label, but unseen pairs look like the other shape.
    labels = pixel(images, 0)
    labels = np.where(np.isin(labels, list(UNSEEN)), labels // 2 * 2 + (1 - labels % 2), labels)
    return np.eye(len(CLASS_NAMES))[labels]

  def embed_texts(tokens):  # One-hot of the class named in the prompt (colour token followed by shape token).
    assert tokens.shape == (16, 8)
    out = np.zeros((len(tokens), len(CLASS_NAMES)))
    for row, ids in enumerate(tokens):
      for pair in zip(ids[:-1], ids[1:]):
        if pair in class_of_word:
          out[row, class_of_word[pair]] = 1.0
    assert np.all(out.sum(axis=1) == 1)
    return out

  config = ml_collections.ConfigDict(dict(
      type='synthetic_zeroshot', batch_size=16, text_len=8,
      data=dict(name='synthetic', split='test', num_examples=40, seed=0, resolution=8)))
  synthetic_zeroshot.validate(config)
  metrics = synthetic_zeroshot.evaluate(embed_images, embed_texts, tokenizer, config)
  labels = FakeSource('test', 40).labels
  seen_frac = np.mean([l not in UNSEEN for l in labels])
  assert metrics == pytest.approx(dict(top1=seen_frac, top1_seen=1.0, top1_unseen=0.0, colour_top1=1.0,
                                       shape_top1=seen_frac))
  # The generic evaluator on the same data takes the class names from it and reports top-k only.
  generic = dict(config.to_dict(), type='zeroshot', templates=list(synthetic_zeroshot.DEFAULT_TEMPLATES), ks=(1, 6))
  zeroshot.validate(generic)
  assert zeroshot.evaluate(embed_images, embed_texts, tokenizer, generic) == pytest.approx(
      dict(top1=seen_frac, top6=1.0))


# ----------------------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------------------
def brute_force_recall(sims, text_to_image, k):
  """Loop reference for recall_at_k with the same rule: sort by (-similarity, index)."""
  n, m = sims.shape
  i2t = [any(text_to_image[j] == i for j in sorted(range(m), key=lambda j: (-sims[i, j], j))[:k])
         for i in range(n)]
  t2i = [text_to_image[j] in sorted(range(n), key=lambda i: (-sims[i, j], i))[:k] for j in range(m)]
  return np.mean(i2t), np.mean(t2i)


def test_recall_identity_embeddings_is_one():
  emb = np.eye(12)
  metrics = retrieval.recall_at_k(emb, emb, np.arange(12))
  assert metrics == {f'{d}_r{k}': 1.0 for d in ('i2t', 't2i') for k in (1, 5, 10)}


def test_recall_permuted_captions():
  n = 10
  perm = np.array([0, 1, 2, 3, 5, 4, 7, 8, 6, 9])  # 4 fixed points in the first 4 + 1 at the end; 5 moved.
  images = np.eye(n)
  # Caption j mostly describes image perm[j] and a little its own image j: own match always ranks second.
  texts = common.l2_normalise(0.9 * np.eye(n)[perm] + 0.1 * np.eye(n))
  metrics = retrieval.recall_at_k(images, texts, np.arange(n), ks=(1, 2, 5))
  fixed = np.mean(perm == np.arange(n))
  assert fixed == 0.5
  assert metrics == pytest.approx(dict(i2t_r1=fixed, i2t_r2=1.0, i2t_r5=1.0, t2i_r1=fixed, t2i_r2=1.0, t2i_r5=1.0))


def test_recall_duplicates_are_judged_by_index():
  # Images 0 and 1 are identical and so are their captions: each query ties, and the tie goes to index 0.
  images = common.l2_normalise(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
  metrics = retrieval.recall_at_k(images, images, np.arange(3), ks=(1, 2))
  assert metrics == pytest.approx(dict(i2t_r1=2 / 3, i2t_r2=1.0, t2i_r1=2 / 3, t2i_r2=1.0))


def test_recall_matches_brute_force_with_several_captions_per_image():
  rng = np.random.default_rng(0)
  n, per_image, d = 9, 3, 4
  images = common.l2_normalise(rng.normal(size=(n, d)))
  text_to_image = np.repeat(np.arange(n), per_image)
  texts = common.l2_normalise(images[text_to_image] + rng.normal(size=(n * per_image, d)))
  texts[5] = texts[4]  # A duplicate caption, to exercise ties.
  metrics = retrieval.recall_at_k(images, texts, text_to_image, ks=(1, 3, 5))
  sims = images.astype(np.float32) @ texts.astype(np.float32).T
  for k in (1, 3, 5):
    i2t, t2i = brute_force_recall(sims, text_to_image, k)
    assert metrics[f'i2t_r{k}'] == pytest.approx(i2t) and metrics[f't2i_r{k}'] == pytest.approx(t2i)


def test_recall_rejects_image_without_caption():
  with pytest.raises(ValueError, match='at least one caption'):
    retrieval.recall_at_k(np.eye(3), np.eye(3)[:2], np.array([0, 1]))


def test_retrieval_evaluate_with_fake_towers(fake_data):
  tokenizer = fake_data
  number_ids = {tokenizer.vocab[f'number{i}']: i for i in range(64)}

  def embed_images(images):
    return np.eye(64)[pixel(images, 1)]

  def embed_texts(tokens):
    return np.eye(64)[[next(number_ids[t] for t in row if t in number_ids) for row in tokens]]

  config = ml_collections.ConfigDict(dict(batch_size=8, text_len=8, data=dict(name='synthetic', num_examples=30)))
  metrics = retrieval.evaluate(embed_images, embed_texts, tokenizer, config)
  assert metrics == {f'{d}_r{k}': 1.0 for d in ('i2t', 't2i') for k in (1, 5, 10)}


# ----------------------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------------------
def clusters(rng, n, num_classes, d, spread=0.1):
  centres = rng.normal(size=(num_classes, d)) * 3.0
  labels = rng.integers(0, num_classes, n)
  return centres[labels] + spread * rng.normal(size=(n, d)), labels


def test_ridge_on_separable_clusters_is_perfect():
  rng = np.random.default_rng(0)
  x, y = clusters(rng, 200, 4, 8)
  w, b = linear_probe.fit_ridge(x[:100], y[:100], num_classes=4, l2=1e-2)
  assert np.mean(linear_probe.ridge_predict(w, b, x[100:]) == y[100:]) == 1.0


def test_ridge_equals_lstsq():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(50, 5)), rng.integers(0, 4, 50)
  targets = np.eye(4)[y]
  design = np.concatenate([x, np.ones((50, 1))], axis=1)  # [X, 1]: the last row of the solution is the bias.
  w, b = linear_probe.fit_ridge(x, y, num_classes=4, l2=0.0)
  expected = np.linalg.lstsq(design, targets, rcond=None)[0]
  np.testing.assert_allclose(np.concatenate([w, b[None]]), expected, atol=1e-10)
  # With l2 > 0: lstsq on the system augmented by sqrt(l2) * I rows that penalise w but not the bias.
  l2 = 3.0
  penalty = np.concatenate([np.sqrt(l2) * np.eye(5), np.zeros((5, 1))], axis=1)
  expected = np.linalg.lstsq(np.concatenate([design, penalty]), np.concatenate([targets, np.zeros((5, 4))]),
                             rcond=None)[0]
  w, b = linear_probe.fit_ridge(x, y, num_classes=4, l2=l2)
  np.testing.assert_allclose(np.concatenate([w, b[None]]), expected, atol=1e-10)


def test_select_l2_prefers_strongest_among_ties_and_avoids_overshrinking():
  rng = np.random.default_rng(2)
  x, y = clusters(rng, 100, 3, 6)
  assert linear_probe.select_l2(x, y, 3, grid=(1e-3, 1e-1, 1.0)) == 1.0  # All perfect -> the largest.
  # Only a weak direction separates the classes; a huge l2 shrinks it away and loses against the noise.
  x2 = np.concatenate([1e-2 * (2 * (y[:, None] == np.arange(3)) - 1), rng.normal(size=(100, 3))], axis=1)
  assert linear_probe.select_l2(x2, y, 3, grid=(1e-6, 1e6)) == 1e-6


def test_linear_probe_evaluate_with_fake_towers(fake_data):
  rng = np.random.default_rng(0)

  def embed_images(images):  # As in the zero-shot test, unseen pairs look like the same colour's other shape.
    labels = pixel(images, 0)
    labels = np.where(np.isin(labels, list(UNSEEN)), labels // 2 * 2 + (1 - labels % 2), labels)
    return np.eye(len(CLASS_NAMES))[labels] + 0.05 * rng.normal(size=(len(labels), len(CLASS_NAMES)))

  config = ml_collections.ConfigDict(dict(train_examples=60, batch_size=16,
                                          data=dict(name='synthetic', num_examples=40)))
  linear_probe.validate(config)
  metrics = linear_probe.evaluate(embed_images, None, None, config)
  # The probe never sees the unseen pairs (and they look like seen ones), so it gets exactly the seen ones right.
  seen_frac = np.mean([l not in UNSEEN for l in FakeSource('test', 40).labels])
  assert metrics == pytest.approx(dict(top1=seen_frac))
  config.l2 = 0.1
  assert linear_probe.evaluate(embed_images, None, None, config) == pytest.approx(metrics)


# ----------------------------------------------------------------------------------------------------------
# Integration: the real SyntheticCaptions and Tokenizer, with oracle towers that read the answer off the data.
# ----------------------------------------------------------------------------------------------------------
def test_evaluators_on_synthetic_captions_with_oracle_towers(tmp_path):
  from jmm.data import synthetic
  from jmm.data import tokenizer as tokenizer_lib

  config = ml_collections.ConfigDict(dict(train_examples=480, batch_size=32, text_len=32,
                                          data=dict(name='synthetic', num_examples=96, resolution=16, seed=3)))
  attributes = {}  # image bytes -> (label, size, position): the oracle image tower looks its input up.
  for split, n in (('test', 96), ('train', 480)):
    source = synthetic.SyntheticCaptions(split, resolution=16, num_examples=n, seed=3)
    for i in range(n):
      ex = source[i]
      attributes[ex['image'].tobytes()] = (ex['label'], ex['size'], ex['position'])
  num_classes, num_keys = len(synthetic.CLASS_NAMES), len(synthetic.SIZES) * len(synthetic.POSITIONS)

  def embed_images(images):  # One-hot of the label, concatenated with a one-hot of (size, position).
    images = np.rint((images + 1.0) * 127.5).astype(np.uint8)
    out = np.zeros((len(images), num_classes + num_keys))
    for row, image in enumerate(images):
      label, size, position = attributes[image.tobytes()]
      out[row, label] = 1.0
      out[row, num_classes + size * len(synthetic.POSITIONS) + position] = 1.0
    return common.l2_normalise(out)

  def embed_texts(tokens):  # The same code read off the decoded text (size / position only if mentioned).
    out = np.zeros((len(tokens), num_classes + num_keys))
    for row, text in enumerate(tokenizer.decode(tokens)):
      out[row, [i for i, name in enumerate(synthetic.CLASS_NAMES) if f' {name}' in f' {text} ']] = 1.0
      for s, size in enumerate(synthetic.SIZES):
        for p, position in enumerate(synthetic.POSITIONS):
          if text.startswith(f'a {size} ') and text.endswith(f' in the {position}'):
            out[row, num_classes + s * len(synthetic.POSITIONS) + p] = 1.0
    assert np.all(out[:, :num_classes].sum(axis=1) == 1), 'every text names exactly one class'
    return common.l2_normalise(out)

  sentences = synthetic.SyntheticCaptions('train', num_examples=2000).captions(2000)
  tokenizer = tokenizer_lib.train_tokenizer(sentences, str(tmp_path / 'tokenizer.model'), vocab_size=64)

  metrics = synthetic_zeroshot.evaluate(embed_images, embed_texts, tokenizer, config)
  assert metrics == pytest.approx(dict(top1=1.0, top1_seen=1.0, top1_unseen=1.0, colour_top1=1.0,
                                       shape_top1=1.0))

  metrics = retrieval.evaluate(embed_images, embed_texts, tokenizer, config)
  assert set(metrics) == {f'{d}_r{k}' for d in ('i2t', 't2i') for k in (1, 5, 10)}
  assert metrics['i2t_r10'] == metrics['t2i_r10'] == 1.0  # Only a few images share all attributes.
  assert metrics['i2t_r1'] >= 0.9 and metrics['t2i_r1'] >= 0.9

  seen = common.load_data(config.data)['seen']
  metrics = linear_probe.evaluate(embed_images, embed_texts, tokenizer, config)
  assert metrics['top1'] == pytest.approx(np.mean(seen))  # The unseen pairs are never in the probe's training.


def test_truncated_texts_are_reported(caplog):
  tokenizer = FakeTokenizer(['a', 'red', 'square'])
  out = common.embed_texts_in_batches(lambda t: t.astype(np.float32), tokenizer, ['a red square', 'a'], 3, 2)
  assert out.shape == (2, 3)
  assert '1 of 2 texts are longer than text_len=3' in caplog.text


def test_ridge_dual_form_matches_primal():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(6, 10)), rng.integers(0, 3, 6)  # Fewer examples than dimensions: the dual path.
  w, b = linear_probe.fit_ridge(x, y, num_classes=3, l2=0.5)
  xc, yc = x - x.mean(0), np.eye(3)[y] - np.eye(3)[y].mean(0)
  np.testing.assert_allclose(w, np.linalg.solve(xc.T @ xc + 0.5 * np.eye(10), xc.T @ yc), atol=1e-10)
  np.testing.assert_allclose(b, np.eye(3)[y].mean(0) - x.mean(0) @ w, atol=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Non-synthetic data fed by config: ArrayRecord / WebDataset / TFDS examples with captions and integer labels.
# ----------------------------------------------------------------------------------------------------------
ANIMALS = ('cat', 'dog', 'bird', 'fish')
TEMPLATES = ('a photo of a {}.', 'a {} in the wild')
RES = 8


def _png(label: int, uid: int) -> bytes:
  """A solid RES x RES PNG (lossless, so the pixels survive): red = 50 * label, green = 8 * uid."""
  image = np.zeros((RES, RES, 3), np.uint8)
  image[..., 0], image[..., 1] = 50 * label, 8 * uid
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, 'PNG')
  return buf.getvalue()


def image_ids(images):
  """(label, uid) planted by `_png`, read back from float images in [-1, 1]."""
  return pixel(images, 0) // 50, pixel(images, 1) // 8


def _examples(uids):
  return [(uid, (uid * 7) % len(ANIMALS), f'a {ANIMALS[(uid * 7) % len(ANIMALS)]} number{uid}') for uid in uids]


TEST, TRAIN = _examples(range(13)), _examples(range(13, 30))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Test and train ArrayRecord files (msgpack maps with a 'label'), a WebDataset shard of the test examples
  (KEY.png, KEY.txt, KEY.cls) and class-name / template text files. One bad record in each test set."""
  from jmm.data import array_record  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp('evaldata')

  def records(examples):
    return [array_record.msgpack.packb({'image': _png(label, uid), 'caption': caption, 'label': label})
            for uid, label, caption in examples]

  test_records = records(TEST)
  test_records.insert(5, array_record.msgpack.packb({'image': b'not an image', 'caption': 'a bad one', 'label': 0}))
  array_record.write_records(str(d / 'test.array_record'), test_records)
  array_record.write_records(str(d / 'train.array_record'), records(TRAIN))
  with tarfile.open(d / 'test-000.tar', 'w') as tar:
    members = []
    for uid, label, caption in TEST[:6]:
      members += [(f'{uid:04d}.png', _png(label, uid)), (f'{uid:04d}.txt', caption.encode()),
                  (f'{uid:04d}.cls', f'{label}\n'.encode())]
    members += [('nolabel.png', _png(1, 13)), ('nolabel.txt', b'a dog number13')]  # Skipped by label readers.
    for uid, label, caption in TEST[6:]:
      members += [(f'{uid:04d}.cls', str(label).encode()), (f'{uid:04d}.png', _png(label, uid)),
                  (f'{uid:04d}.txt', caption.encode())]
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  (d / 'classes.txt').write_text('\n'.join(ANIMALS) + '\n')
  (d / 'templates.txt').write_text('\n'.join(TEMPLATES) + '\n\n')
  return d


def animal_tokenizer():
  words = ['a', 'photo', 'of', 'in', 'the', 'wild', *ANIMALS] + [f'number{i}' for i in range(64)]
  return FakeTokenizer(words)


def array_record_data(files, split='test', **kw):
  return dict(name='array_record', split=split, paths=str(files / f'{split}.array_record'), resolution=RES, **kw)


def test_zeroshot_on_file_data_with_class_names_and_templates_from_files(files):
  tokenizer = animal_tokenizer()
  prompts = []

  def embed_images(images):  # Right class, except that every third example leans to the next class.
    labels, uids = image_ids(images)
    eye = np.eye(len(ANIMALS))
    return np.where((uids % 3 == 0)[:, None], 0.8 * eye[(labels + 1) % 4] + 0.6 * eye[labels], eye[labels])

  def embed_texts(tokens):  # One-hot of the animal named; records each prompt it is given.
    words = {v: k for k, v in tokenizer.vocab.items()}
    out = np.zeros((len(tokens), len(ANIMALS)))
    for row, ids in enumerate(tokens):
      text = ' '.join(words.get(int(t), '') for t in ids if t > 1)
      prompts.append(text)
      out[row, [i for i, a in enumerate(ANIMALS) if a in text.split()]] = 1.0
    return out

  good_uids = np.array([uid for uid, _, _ in TEST])
  expected = dict(top1=np.mean(good_uids % 3 != 0), top2=1.0)
  for data in (array_record_data(files),
               dict(name='webdataset', paths=str(files / 'test-{000..000}.tar'), resolution=RES)):
    config = ml_collections.ConfigDict(dict(
        type='zeroshot', data=data, class_names=str(files / 'classes.txt'), templates=str(files / 'templates.txt'),
        label_key='label' if data['name'] == 'array_record' else 'cls', ks=(1, 2), batch_size=4, text_len=8))
    zeroshot.validate(config)
    prompts.clear()
    assert zeroshot.evaluate(embed_images, embed_texts, tokenizer, config) == pytest.approx(expected), data['name']
    assert prompts[:8] == [t.format(a).replace('.', '') for a in ANIMALS for t in TEMPLATES]  # Class-major.
  # Class names and templates given as lists, num_examples honoured (the bad record is skipped, not counted).
  config = dict(data=array_record_data(files, num_examples=7), class_names=list(ANIMALS), batch_size=4,
                text_len=8, ks=(1,))
  assert zeroshot.evaluate(embed_images, embed_texts, tokenizer, config) == pytest.approx(
      dict(top1=np.mean(good_uids[:7] % 3 != 0)))


def test_zeroshot_on_tfds_labels(monkeypatch):
  from jmm.data import mixture, tfds_source  # pylint: disable=g-import-not-at-top

  class FakeTfds:
    def __len__(self):
      return 6

    def __getitem__(self, i):
      image = np.zeros((RES, RES, 3), np.uint8)
      image[..., 0], image[..., 1] = 50 * (i % 4), i
      return {'image': image, 'caption': np.array(b'a photo'), 'label': np.int64(i % 4)}

  monkeypatch.setattr(mixture, '_CACHE', {})
  config = dict(data=dict(name='tfds', tfds_name='fake_animals', resolution=RES), class_names=list(ANIMALS),
                batch_size=4, text_len=8, ks=(1,))
  zeroshot.validate(config)
  tokenizer = FakeTokenizer(ANIMALS)
  animal_of_token = {tokenizer.vocab[a]: i for i, a in enumerate(ANIMALS)}

  def embed_images(images):  # The label planted in the pixels, except that example 5 looks like class 0.
    labels = pixel(images, 0) // 50
    return np.eye(4)[np.where(pixel(images, 1) == 5, 0, labels)]

  def embed_texts(tokens):
    return np.eye(4)[[animal_of_token[t] for t in tokens[:, 0]]]

  def fake_tfds(name, split, data_dir):
    assert (name, split, data_dir or None) == ('fake_animals', 'test', None)
    return FakeTfds()

  monkeypatch.setattr(tfds_source, '_tfds_data_source', fake_tfds)
  metrics = zeroshot.evaluate(embed_images, embed_texts, tokenizer, dict(config, templates=['{}']))
  assert metrics == {'top1': pytest.approx(5 / 6)}  # Labels 0 1 2 3 0 1; the last one is missed.


def test_retrieval_on_webdataset(files):
  tokenizer = animal_tokenizer()
  number_ids = {tokenizer.vocab[f'number{i}']: i for i in range(64)}
  swapped = {0: 1, 1: 0}  # Images 0 and 1 embed as each other: both directions miss them at rank 1.

  def embed_images(images):
    return np.eye(64)[[swapped.get(u, u) for u in image_ids(images)[1]]]

  def embed_texts(tokens):
    return np.eye(64)[[next(number_ids[t] for t in row if t in number_ids) for row in tokens]]

  config = dict(type='retrieval', data=dict(name='webdataset', paths=str(files / 'test-000.tar'), resolution=RES,
                                            image_key='png', caption_key='txt'),
                batch_size=5, text_len=8, ks=(1, 2))
  retrieval.validate(config)
  metrics = retrieval.evaluate(embed_images, embed_texts, tokenizer, config)
  n = len(TEST) + 1  # The example without a label counts here: retrieval reads no label.
  assert metrics == pytest.approx(dict(i2t_r1=(n - 2) / n, i2t_r2=1.0, t2i_r1=(n - 2) / n, t2i_r2=1.0))
  data = common.load_data(config['data'], fields=('image', 'caption'))
  assert sorted(image_ids(common.images_to_float(data['image']))[1]) == list(range(n))
  sims = embed_images(common.images_to_float(data['image'])) @ embed_texts(tokenizer.encode(data['caption'], 8)).T
  for k in (1, 2):  # The direct computation: brute force over the same pairs.
    i2t, t2i = brute_force_recall(sims, np.arange(n), k)
    assert metrics[f'i2t_r{k}'] == pytest.approx(i2t) and metrics[f't2i_r{k}'] == pytest.approx(t2i)


def test_linear_probe_on_array_record(files):
  def embed_images(images):  # The label's one-hot, a little uid noise; every fourth test image looks mislabelled.
    labels, uids = image_ids(images)
    fooled = (uids < 13) & (uids % 4 == 0)
    labels = np.where(fooled, (labels + 1) % 4, labels)
    return np.eye(4)[labels] + 0.01 * np.sin(np.outer(uids, np.arange(4)))

  config = dict(type='linear_probe', data=array_record_data(files), train_data=array_record_data(files, 'train'),
                batch_size=8)
  linear_probe.validate(config)
  metrics = linear_probe.evaluate(embed_images, None, None, config)
  uids = np.array([uid for uid, _, _ in TEST])
  assert metrics == pytest.approx(dict(top1=np.mean(uids % 4 != 0)))
  # Against the direct computation on the same embeddings (num_classes = max label + 1 = 4).
  train, test = (common.load_data(d, fields=('image', 'label')) for d in (config['train_data'], config['data']))
  x_train, x_test = (embed_images(common.images_to_float(d['image'])) for d in (train, test))
  l2 = linear_probe.select_l2(x_train, train['label'], 4, seed=0)
  w, b = linear_probe.fit_ridge(x_train, train['label'], 4, l2)
  assert metrics['top1'] == np.mean(linear_probe.ridge_predict(w, b, x_test) == test['label'])


def test_generic_zeroshot_knows_nothing_of_the_synthetic_data():
  assert 'synthetic' not in inspect.getsource(zeroshot)
  modules = {m.__name__ for m in vars(zeroshot).values() if inspect.ismodule(m)}
  assert 'jmm.data.synthetic' not in modules


def test_default_eval_config_validates():
  heldout = dict(name='synthetic', split='test', resolution=32, seed=1, max_objects=1)
  evals = ml_collections.ConfigDict(dict(
      zeroshot=dict(type='synthetic_zeroshot', every=1000, batch_size=250, text_len=12,
                    data=dict(heldout, num_examples=2000)),
      retrieval=dict(type='retrieval', every=0, batch_size=250, text_len=12, data=dict(heldout, num_examples=1000)),
      linear_probe=dict(type='linear_probe', every=0, batch_size=250, data=dict(heldout, num_examples=1000),
                        train_data=dict(heldout, split='train', num_examples=2000)),
  ))
  modules = dict(synthetic_zeroshot=synthetic_zeroshot, retrieval=retrieval, linear_probe=linear_probe)
  for section in evals.values():
    modules[section.type].validate(section)


@pytest.mark.parametrize('module, config, field', [
    (zeroshot, dict(templates=['a {} of {}']), r"templates\[0\]='a \{\} of \{\}'"),
    (zeroshot, dict(templates=['no slot']), r'^templates\[0\]'),
    (zeroshot, dict(data=dict(name='array_record', paths='FILES/test.array_record')), r'^class_names is not set'),
    (zeroshot, dict(class_names='FILES/missing.txt'), r'^class_names: cannot read'),
    (zeroshot, dict(data=dict(name='imagenet')), r"^data\.name='imagenet'"),
    (zeroshot, dict(data=None), r'^data is not set'),
    (zeroshot, dict(resolution=32), r'^resolution is set on the eval'),
    (zeroshot, dict(data=dict(name='synthetic', num_examples=0)), r'^data\.num_examples'),
    (zeroshot, dict(data=dict(name='webdataset', paths='FILES/nothing-*.tar')), r'^data\.paths'),
    (zeroshot, dict(data=dict(name='array_record', paths='FILES/test.array_record', transform='random_resized_crop'),
                    class_names=['a']), r'^data\.transform'),
    (zeroshot, dict(data=dict(name='tfds')), r'^data\.tfds_name'),
    (zeroshot, dict(ks=[0]), r'^ks'),
    (synthetic_zeroshot, dict(data=dict(name='array_record', paths='FILES/test.array_record')),
     r"^data\.name='array_record'"),
    (retrieval, dict(batch_size=0), r'^batch_size'),
    (retrieval, dict(data=dict(name='synthetic', split='val')), r'^data\.split'),
    (linear_probe, dict(data=dict(name='array_record', paths='FILES/test.array_record')), r'^train_data is not set'),
    (linear_probe, dict(train_data=dict(name='synthetic', max_objects=0)), r'^train_data\.max_objects'),
    (linear_probe, dict(holdout_fraction=1.5), r'^holdout_fraction'),
    (linear_probe, dict(l2=-1.0), r'^l2 '),
    (linear_probe, dict(train_data=dict(name='synthetic', split='train'), train_examples=96), r'^train_examples'),
])
def test_validate_names_the_bad_field(files, module, config, field):
  name = module.__name__.split('.')[-1]
  base = dict(type=name, data=dict(name='synthetic', split='test', resolution=8))
  base.update({k: str(v).replace('FILES', str(files)) if isinstance(v, str) else v for k, v in config.items()})
  if isinstance(base.get('data'), dict):
    base['data'] = {k: v.replace('FILES', str(files)) if isinstance(v, str) else v for k, v in base['data'].items()}
  module.validate(dict(type=name, data=dict(name='synthetic')))  # The base shape is valid.
  with pytest.raises(ConfigError, match=field):
    module.validate(ml_collections.ConfigDict(base) if name != 'zeroshot' else base)
  with pytest.raises(ConfigError, match='^config.evals.x.'):  # The runner's prefix leads the field's path.
    module.validate(base, prefix='config.evals.x.')
  with pytest.raises(ConfigError, match='^config.evals.x.'):  # The runner's prefix leads the field's path.
    module.validate(base, prefix='config.evals.x.')


def test_mean_per_class_accuracy_equals_a_loop():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(40, 5))
  labels = np.r_[np.zeros(30, int), rng.integers(1, 5, size=10)]  # Imbalanced: class 0 dominates.
  want = []
  for c in sorted(set(labels.tolist())):
    rows = [i for i in range(len(labels)) if labels[i] == c]
    want.append(sum(int(np.argmax(logits[i]) == c) for i in rows) / len(rows))
  assert zeroshot.mean_per_class_accuracy(logits, labels) == pytest.approx(np.mean(want))
  assert zeroshot.mean_per_class_accuracy(logits, labels) != pytest.approx(zeroshot.topk_accuracy(logits, labels, 1))


def test_standalone_evaluate_needs_a_checkpoint_or_weights(tmp_path):
  from jmm import evaluate
  from configs import siglip
  config = siglip.get_config()
  with pytest.raises(ConfigError, match='init_from is empty'):
    evaluate.evaluate_checkpoint(config, str(tmp_path))
