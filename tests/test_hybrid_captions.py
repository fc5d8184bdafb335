"""Hybrid captions (Lai et al. 2024): AltText-like synthetic captions, per-example caption mixes on synthetic and
file data (jmm.data.hybrid_captions), their config checks and configs/hybrid.py."""
import collections
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from jmm import validation
from jmm.data import array_record
from jmm.data import build as data_build
from jmm.data import hybrid_captions
from jmm.data import pipeline
from jmm.data import synthetic as S
from jmm.data import tfds_source
from jmm.data import transforms
from jmm.data import webdataset
from jmm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITION_WORDS = {w for p in S.POSITIONS for w in p.split()}


def _image_bytes(i: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, 'JPEG')
  return buf.getvalue()


def _load_hybrid(arg=None):
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location('hybrid', os.path.join(ROOT, 'configs', 'hybrid.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_default_mix_is_todays_data_bit_for_bit():
  """The default mix ({'caption': 1}, '' or None) draws nothing new: examples and tokenizer text are today's."""
  # Today's first captions (seed 0), so a change of the default stream fails here, not only in the README.
  assert S.SyntheticCaptions('train').captions(3) == [
      'a small red triangle in the top right', 'a small cyan diamond in the left', 'a large blue star in the left']
  kw = dict(resolution=16, max_objects=2, negative_captions='shape,position', short_caption_prob=0.3)
  plain = S.SyntheticCaptions('train', **kw)
  for option in ('', 'caption=1', {'caption': 2.0}):
    same = S.SyntheticCaptions('train', captions=option, **kw)
    for i in (0, 5, 17, 999):
      a, b = plain[i], same[i]
      assert set(a) == set(b)
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['boxes'], b['boxes'])
      assert (a['caption'], a['negative_caption'], a['label']) == (b['caption'], b['negative_caption'], b['label'])
    assert same.captions(50) == plain.captions(50)


def test_mix_changes_only_captions_and_draws_each_style_at_its_ratio():
  """A 50/50 mix: about half alt text (which never says where), deterministic per index; images, boxes and
  labels are the default's, and an example drawn 'caption' is the default example's caption and negative."""
  kw = dict(resolution=16, num_examples=2000, seed=3, negative_captions='shape')
  plain = S.SyntheticCaptions('train', **kw)
  mixed = S.SyntheticCaptions('train', captions='alt_text=0.5,caption=0.5', **kw)
  texts = mixed.captions(2000)
  assert texts == S.SyntheticCaptions('train', captions={'alt_text': 1, 'caption': 1}, **kw).captions(2000)
  alt = [t for t in texts if ' in the ' not in t]
  assert 0.45 < len(alt) / len(texts) < 0.55, len(alt)
  styles = collections.Counter()
  for i in range(0, 2000, 50):
    a, b = plain[i], mixed[i]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['boxes'], b['boxes'])
    assert a['label'] == b['label'] and b['caption'] == texts[i] == mixed[i]['caption']
    styles[b['caption_style']] += 1
    if b['caption_style'] == 'caption':
      assert (b['caption'], b['negative_caption']) == (a['caption'], a['negative_caption'])
    else:
      assert b['caption'] == b['alt_text'] and ' in the ' not in b['negative_caption']
  assert set(styles) == {'caption', 'alt_text'}


def test_alt_text_is_terse_noisy_web_text_about_object_0():
  """Alt text never names a position, mostly drops the size, sometimes the colour or shape and other objects,
  reorders words and adds web boilerplate; it always names object 0's colour or shape, and its hard negative
  keeps the noise and swaps what it names of object 0 (shape, else colour) for a pair seen in 'train'."""
  source = S.SyntheticCaptions('train', resolution=8, seed=1, max_objects=3, captions='alt_text',
                               negative_captions='shape')
  fillers = set(' '.join(S._ALT_PREFIXES + S._ALT_SUFFIXES + S._ALT_NUMBERS).split())
  counts = collections.Counter()
  for i in range(400):
    objects = source._attributes(source._rng(i))
    _, alt_u = source._style_draws(i)
    text = S.alt_text(objects, alt_u)
    words = text.replace(',', '').split()
    assert not POSITION_WORDS & set(words) and 'a' not in words, text
    colour, shape, size, _ = objects[0]
    assert S.COLOURS[colour] in words or S.SHAPES[shape] in words, text
    counts['size'] += S.SIZES[size] in words
    counts['filler'] += bool(fillers & set(words))
    counts['swapped'] += any(words[k] in S.SHAPES and words[k + 1] in S.COLOURS for k in range(len(words) - 1))
    counts['others_named'] += sum(S.SHAPES[o[1]] in words or S.COLOURS[o[0]] in words for o in objects[1:])
    counts['others'] += len(objects) - 1
  assert 40 < counts['size'] < 160 and 120 < counts['filler'] < 300 and counts['swapped'] > 20, counts
  assert counts['others_named'] < 0.6 * counts['others'], counts
  shape_swaps = 0
  for i in range(0, 200, 5):
    e = source[i]
    assert e['caption_style'] == 'alt_text' and e['caption'] == e['alt_text'] != e['negative_caption']
    diff = [(a, b) for a, b in zip(e['caption'].split(), e['negative_caption'].split()) if a != b]
    assert len(diff) == 1 and len(e['caption'].split()) == len(e['negative_caption'].split()), e
    old, new = diff[0]
    if old in S.SHAPES:
      shape_swaps += 1
      assert old == S.SHAPES[e['shape']] and not S.is_unseen(e['colour'], S.SHAPES.index(new))
    else:
      assert old == S.COLOURS[e['colour']] and not S.is_unseen(S.COLOURS.index(new), e['shape'])
  assert shape_swaps > 25


def test_short_style_and_short_caption_prob_together():
  kw = dict(resolution=8, num_examples=100, seed=2, negative_captions='shape,position')
  short = S.SyntheticCaptions('train', captions='short', **kw)
  for i in range(0, 100, 10):
    e = short[i]
    assert e['caption'] == S.short_phrase(e['colour'], e['shape']) and e['caption_style'] == 'short'
    assert e['negative_caption'].startswith(f'a {S.COLOURS[e["colour"]]} ')
    assert e['negative_caption'] != e['caption']
  both = S.SyntheticCaptions('train', captions='caption=1,short=1', short_caption_prob=1.0, **kw)
  assert all(' in the ' not in both[i]['caption'] for i in range(0, 100, 10))  # The old knob cuts 'caption'.
  with pytest.raises(ValueError, match=r"captions=.*'dense'.*known"):
    S.SyntheticCaptions('train', captions='dense=1')


def test_tokenizer_text_has_alt_text():
  config = _load_hybrid()
  texts = data_build.make_source(config).captions(300)
  words = {w for t in texts for w in t.split()}
  assert {'clipart', 'icon', 'jpg'} & words and any(' in the ' in t for t in texts)
  assert data_build.make_source(_load_hybrid('captions=descriptive')).captions(300) == \
      S.SyntheticCaptions('train').captions(300)


def test_parse_and_config_errors_name_the_field():
  assert hybrid_captions.parse('') == {} and hybrid_captions.parse(None) == {}
  assert hybrid_captions.parse('txt=0.25, json/alt=0.75') == {'txt': 0.25, 'json/alt': 0.75}
  assert hybrid_captions.parse('alt_text') == {'alt_text': 1.0}
  config = _load_hybrid()
  validation.validate(config)
  for value, pattern in (('alt=1', "config.data.captions='alt=1'.*no caption field 'alt'"),
                         ('caption=-0.5', r'config.data.captions=.*>= 0'),
                         ('caption=0,alt_text=0', r'config.data.captions=.*all ratios are 0'),
                         ('caption=1,caption=2', r'config.data.captions=.*named twice')):
    config.data.captions = value
    with pytest.raises(ConfigError, match=pattern):
      validation.validate(config)
  with pytest.raises(ConfigError, match="captions='dense'"):
    _load_hybrid('captions=dense')
  config = _load_hybrid()
  config.evals.zeroshot.data.captions = 'alt_text=1'  # Evaluation keeps the descriptive captions.
  with pytest.raises(ConfigError, match=r'config.evals.zeroshot: data.captions=.*training data'):
    validation.validate(config)


def _write_tar(path, members) -> None:
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def shards(tmp_path_factory):
  """One tar shard of 12 keys: txt + json {alt} (0-7), txt only (8, 9), json only (10), neither (11)."""
  d = tmp_path_factory.mktemp('hybrid_wds')
  members = []
  for i in range(12):
    members.append((f'{i:04d}.jpg', _image_bytes(i)))
    if i not in (10, 11):
      members.append((f'{i:04d}.txt', f'web {i}'.encode()))
    if i < 8 or i == 10:
      members.append((f'{i:04d}.json', json.dumps({'alt': f'syn {i}', 'width': 20}).encode()))
  _write_tar(d / 'a.tar', members)
  return str(d / 'a.tar')


def _examples(source, seed=0, transform=None):
  transform = transform or transforms.ImageTransform(8, mode='random_resized_crop', crop_scale=(0.3, 1.0))
  ds = pipeline.make_example_dataset([source], transform, seed=seed, shuffle=False, num_epochs=2)
  return [ds[i] for i in range(len(ds))]


def test_webdataset_draws_among_the_fields_present(shards, tmp_path):
  """Ratio 1:0 and 0:1 read one field (a key lacking it falls back to the other field, one with neither is a
  bad record); a mix draws both, per position, deterministically; augmentation draws do not change."""
  only_txt = _examples(webdataset.WebDatasetSource(shards, captions={'txt': 1, 'json/alt': 0}))
  assert [e.get('caption') for e in only_txt[:12]] == [f'web {i}' for i in range(10)] + [None, None]
  assert [e.get('bad') for e in only_txt[10:12]] == ['record', 'record']  # txt=1 alone: 10 has no choice.
  only_alt = _examples(webdataset.WebDatasetSource(shards, captions='json/alt'))
  assert [e.get('caption') for e in only_alt[:12]] == [f'syn {i}' for i in range(8)] + [None, None, 'syn 10', None]
  mixed_source = webdataset.WebDatasetSource(shards, captions=hybrid_captions.parse('txt=1,json/alt=1'))
  mixed = _examples(mixed_source)
  captions = [e.get('caption') for e in mixed]
  assert captions[8:12] == ['web 8', 'web 9', 'syn 10', None] and 'error' in mixed[11]
  assert 'none of the caption members' in mixed[11]['error']
  both = captions[:8] + captions[12:20]  # Keys 0-7 in each of the two epochs.
  assert all(c in (f'web {i % 8}', f'syn {i % 8}') for i, c in enumerate(both))
  assert {c.split()[0] for c in both} == {'web', 'syn'}
  assert captions == [e.get('caption') for e in _examples(mixed_source)]  # Deterministic.
  assert captions[:12] != captions[12:24]  # Each epoch draws anew (positions differ).
  plain = _examples(webdataset.WebDatasetSource(shards))
  for a, b in zip(plain[:10], mixed[:10]):
    np.testing.assert_array_equal(a['image'], b['image'])  # Same crops: the caption has its own stream.
  assert plain[0]['caption'] == 'web 0' and plain[10].get('bad') == 'record'  # No mix: today's reading.
  assert {t.split()[0] for t in mixed_source.captions(10)} == {'web', 'syn'}
  for _ in range(2):  # Indexed, then read from the index cache (its rows keep every caption member).
    cached = webdataset.WebDatasetSource(shards, captions='txt=1,json/alt=1', index_cache=str(tmp_path))
    assert [e.get('caption') for e in _examples(cached)] == captions
    assert len(list(tmp_path.glob('a.tar.*.index.npz'))) == 1


def test_array_record_and_tfds_fields(tmp_path):
  records = [array_record.msgpack.packb({'image': _image_bytes(i), 'caption': f'web {i}',
                                         'meta': {'alt': f'syn {i}' if i % 2 else ''}}) for i in range(6)]
  records.append(array_record.msgpack.packb({'image': _image_bytes(6)}))
  array_record.write_records(str(tmp_path / 'r.array_record'), records)
  source = array_record.ArrayRecordSource(str(tmp_path / 'r.array_record'), captions={'meta/alt': 1.0})
  got = [e.get('caption') for e in _examples(source)[:7]]
  assert got == [None, 'syn 1', None, 'syn 3', None, 'syn 5', None]  # Empty text is no choice.
  mixed = array_record.ArrayRecordSource(str(tmp_path / 'r.array_record'), captions={'meta/alt': 1, 'caption': 1})
  assert [e.get('caption') for e in _examples(mixed)[:7:2]] == ['web 0', 'web 2', 'web 4', None]
  fake = [{'image': np.zeros((9, 9, 3), np.uint8), 'caption': b'web', 'synthetic': np.array([b'', b'syn'])}]
  tfds = tfds_source.TfdsSource('fake', captions={'synthetic': 1}, data_source_fn=lambda *a: fake)
  assert tfds.captions(5) == ['syn'] and _examples(tfds)[0]['caption'] == 'syn'


def test_file_data_config(shards):
  config = _load_hybrid('data=webdataset,res=8')
  assert config.data.captions == ''
  config.data.update(paths=shards, captions='txt=0.5,json/alt=0.5')
  validation.validate(config)
  source = data_build.make_source(config)
  assert source.caption_ratios == {'txt': 0.5, 'json/alt': 0.5}
  config.data.update(name='mixture', mixture=[dict(name='web', type='webdataset', weight=1.0, paths=shards,
                                                   captions='txt=-1')])
  with pytest.raises(ConfigError, match=r'config.data.mixture\[0\].captions=.*>= 0'):
    validation.validate(config)
