"""Tests for `python -m jmm.data.prepare`: folders and caption files -> ArrayRecord shards that train."""
import io
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from jmm.data import array_record
from jmm.data import prepare
from jmm.data import transforms


def _save(path, i, fmt='JPEG', size=(20, 28)):
  rng = np.random.default_rng(i)
  Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path, fmt)


def _folder(tmp_path):
  """A folder with 6 good pairs (one nested, one PNG), an image without caption, a corrupt image."""
  d = tmp_path / 'images'
  (d / 'sub').mkdir(parents=True)
  good = {}
  for i in range(6):
    folder = d / 'sub' if i == 5 else d
    ext, fmt = ('png', 'PNG') if i == 2 else ('jpg', 'JPEG')
    _save(folder / f'img{i}.{ext}', i, fmt)
    (folder / f'img{i}.txt').write_text(f'caption number {i}\n')
    good[f'caption number {i}'] = folder / f'img{i}.{ext}'
  _save(d / 'lonely.jpg', 50)  # No caption.
  (d / 'broken.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  (d / 'broken.txt').write_text('caption of a broken image')
  (d / 'notes.md').write_text('not an image')
  return d, good


def _read_all(out_dir):
  source = array_record.ArrayRecordSource(os.path.join(out_dir, 'data-*.array_record'))
  return [source[i] for i in range(len(source))]


def test_folder_to_shards_roundtrip(tmp_path):
  d, good = _folder(tmp_path)
  summary = prepare.prepare(prepare.find_images(str(d)), str(tmp_path / 'out'), shard_size=4, progress=False)
  assert summary['written'] == 6 and summary['missing_caption'] == 1 and summary['bad_image'] == 1
  assert summary['shards'] == ['data-00000.array_record', 'data-00001.array_record']
  records = _read_all(tmp_path / 'out')
  assert sorted(r['caption'] for r in records) == sorted(good)
  for record in records:  # Image bytes are stored unchanged and decode to the original pixels.
    assert record['image'] == good[record['caption']].read_bytes()
  assert json.loads((tmp_path / 'out' / 'data.json').read_text())['written'] == 6


def test_csv_jsonl_and_max_size(tmp_path):
  for i in range(3):
    _save(tmp_path / f'{i}.jpg', i, size=(60, 90))
  (tmp_path / 'pairs.csv').write_text('file,text\n0.jpg,"a, quoted caption"\n1.jpg,second\nmissing.jpg,gone\n'
                                      '2.jpg,\n')
  summary = prepare.prepare(prepare.read_caption_file(str(tmp_path / 'pairs.csv'), 'file', 'text'),
                            str(tmp_path / 'csv'), max_size=30, progress=False)
  assert (summary['written'], summary['missing_caption'], summary['bad_image']) == (2, 1, 1)
  records = _read_all(tmp_path / 'csv')
  assert [r['caption'] for r in records] == ['a, quoted caption', 'second']
  assert Image.open(io.BytesIO(records[0]['image'])).size == (30, 20)  # Longer side shrunk to 30.
  lines = [json.dumps({'path': str(tmp_path / f'{i}.jpg'), 'caption': f'json {i}'}) for i in range(3)]
  (tmp_path / 'pairs.jsonl').write_text('\n'.join(lines) + '\n')
  summary = prepare.prepare(prepare.read_caption_file(str(tmp_path / 'pairs.jsonl')), str(tmp_path / 'jl'),
                            progress=False)
  assert summary['written'] == 3
  image = transforms.ImageTransform(16, 'resize_crop')(_read_all(tmp_path / 'jl')[2]['image'])
  assert image.shape == (16, 16, 3)


def test_command_line(tmp_path):
  d, _ = _folder(tmp_path)
  env = {**os.environ, 'PYTHONPATH': os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
  run = subprocess.run([sys.executable, '-m', 'jmm.data.prepare', f'--images={d}', f'--out={tmp_path / "o"}',
                        '--shard_size=100'], capture_output=True, text=True, env=env, check=False)
  assert run.returncode == 0, run.stderr
  assert 'wrote 6 records in 1 shards' in run.stdout
  assert '8/8 (100.0%)' in run.stderr and '2 skipped' in run.stderr  # The progress bar's last line.
  bad = subprocess.run([sys.executable, '-m', 'jmm.data.prepare', f'--captions={tmp_path}/none.csv',
                        f'--out={tmp_path / "o2"}'], capture_output=True, text=True, env=env, check=False)
  assert bad.returncode == 2 and 'none.csv' in bad.stderr
