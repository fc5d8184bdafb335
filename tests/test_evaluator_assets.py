"""The published lists shipped in jmm/evaluators/assets/ and the names zeroshot gives them."""
import fnmatch
import pathlib

import pytest

from jmm.errors import ConfigError
from jmm.evaluators import zeroshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
ASSETS = ('imagenet_classes.txt', 'clip_templates.txt', 'clip_templates_short.txt')


def test_imagenet_class_names_as_published():
  names = zeroshot.asset_lines('imagenet_classes.txt')
  assert len(names) == 1000
  # Label order is the standard synset-sorted ILSVRC-2012 order: spot checks along the list.
  assert names[:5] == ['tench', 'goldfish', 'great white shark', 'tiger shark', 'hammerhead shark']
  assert (names[21], names[134], names[151], names[517], names[999]) == (
      'kite (bird of prey)', 'crane bird', 'Chihuahua', 'construction crane', 'toilet paper')
  assert names[269] == 'grey wolf' and names[271] == 'red wolf or maned wolf' and names[677] == 'metal nail'
  assert all(n == n.strip() and n for n in names)
  # OpenAI's list repeats two names (kept, so line i stays label i): missile and sunglasses, nothing else.
  repeats = {n: [i for i, m in enumerate(names) if m == n] for n in set(names) if names.count(n) > 1}
  assert repeats == {'missile': [657, 744], 'sunglasses': [836, 837]}


def test_clip_templates_as_published():
  templates = zeroshot.asset_lines('clip_templates.txt')
  short = zeroshot.asset_lines('clip_templates_short.txt')
  assert len(templates) == 80 and len(set(templates)) == 80
  assert (templates[0], templates[35], templates[-1]) == (
      'a bad photo of a {}.', 'a {} in a video game.', 'a tattoo of the {}.')
  assert short == ['itap of a {}.', 'a bad photo of the {}.', 'a origami {}.', 'a photo of the large {}.',
                   'a {} in a video game.', 'art of the {}.', 'a photo of the small {}.']
  assert set(short) <= set(templates)
  assert all(t.count('{}') == 1 for t in templates)


def test_assets_are_package_data():
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+.
  package_data = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['setuptools']['package-data']
  patterns = package_data['jmm.evaluators']
  for name in ASSETS:
    assert (ROOT / 'jmm/evaluators/assets' / name).is_file()
    assert any(fnmatch.fnmatch(f'assets/{name}', p) for p in patterns), name


def test_zeroshot_resolves_named_lists(tmp_path, monkeypatch):
  data = dict(name='synthetic')
  assert len(zeroshot.class_names_from(dict(class_names='imagenet'), data)) == 1000
  assert len(zeroshot.templates_from(dict(templates='clip80'))) == 80
  assert zeroshot.templates_from(dict(templates='clip_short'))[0] == 'itap of a {}.'
  # An existing file wins over a name; a list is taken as is.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'imagenet').write_text('cat\ndog\n')
  assert zeroshot.class_names_from(dict(class_names='imagenet'), data) == ['cat', 'dog']
  assert zeroshot.templates_from(dict(templates=['clip80 {}'])) == ['clip80 {}']
  with pytest.raises(ConfigError, match=r"^config\.evals\.zs\.templates='clip81' is neither a file nor a named"):
    zeroshot.templates_from(dict(templates='clip81'), prefix='config.evals.zs.')
  with pytest.raises(ConfigError, match=r'^class_names: cannot read the file'):
    zeroshot.class_names_from(dict(class_names='missing/classes.txt'), data)
