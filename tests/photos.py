"""Real photographs for eval-data tests: scikit-image's sample images, hand-labelled and hand-captioned, written in
every layout the eval sources read (class folders, WebDataset, ArrayRecord, CSV, JSONL, a prepared TFDS set).

The files are copied byte for byte (never re-encoded), so readers meet real JPEGs and PNGs: RGB, greyscale ('L')
and RGBA, of odd sizes (451 x 300, 741 x 500, ...). Each photo has a class (CLASSES, sorted: label i is the i-th,
as a class-folder tree numbers them) and two to three true captions; one caption belongs to two photos.
"""
import csv
import io
import json
import os
import tarfile
from typing import NamedTuple, Sequence

import numpy as np


class Photo(NamedTuple):
  file: str  # In scikit-image's data folder.
  cls: str
  captions: tuple


PHOTOS = (
    Photo('astronaut.png', 'person', ('a smiling astronaut in an orange spacesuit',
                                      'a woman astronaut beside her helmet and a model of the space shuttle',
                                      'an astronaut portrait in front of an american flag')),
    Photo('camera.png', 'person', ('a black and white photo of a man filming with a camera on a tripod',
                                   'a cameraman in a dark coat on a field with buildings behind him',
                                   'a black and white photo')),  # Also moon.png's: a caption of two images.
    Photo('chelsea.png', 'animal', ('a close-up of the face of a tabby cat',
                                    'a cat with green eyes looking to the side')),
    Photo('horse.png', 'animal', ('a black silhouette of a horse on a white background',
                                  'the outline of a standing horse seen from the side')),
    Photo('coffee.png', 'drink', ('a cup of espresso on a red saucer with a spoon',
                                  'a red coffee cup on a wooden table')),
    Photo('rocket.jpg', 'vehicle', ('a rocket on its launch pad at dusk',
                                    'a rocket standing between launch towers with lights at night')),
    Photo('motorcycle_left.png', 'vehicle', ('a red motorcycle parked in a garage',
                                             'a motorbike in a workshop with shelves of boxes behind it')),
    Photo('moon.png', 'space', ('a grey close-up of the surface of the moon',
                                'craters on the lunar surface in black and white', 'a black and white photo')),
    Photo('hubble_deep_field.jpg', 'space', ('a deep field image of many distant galaxies',
                                             'hundreds of colourful galaxies on a black sky',
                                             'a telescope view of deep space')),
)
CLASSES = sorted({p.cls for p in PHOTOS})  # ['animal', 'drink', 'person', 'space', 'vehicle']
TFDS_NAME = 'jmm_test_photos'


def label(photo: Photo) -> int:
  return CLASSES.index(photo.cls)


def data_dir() -> str:
  import skimage  # pylint: disable=g-import-not-at-top  (a test-only dependency)
  return os.path.join(os.path.dirname(skimage.__file__), 'data')


def raw(photo: Photo) -> bytes:
  with open(os.path.join(data_dir(), photo.file), 'rb') as f:
    return f.read()


def key(photo: Photo) -> str:
  return os.path.splitext(photo.file)[0]


def ext(photo: Photo) -> str:
  return os.path.splitext(photo.file)[1].lstrip('.')


def write_folder(root, photos: Sequence[Photo] = PHOTOS) -> str:
  """ROOT/CLASS/FILE for each photo; returns ROOT."""
  for photo in photos:
    os.makedirs(os.path.join(root, photo.cls), exist_ok=True)
    with open(os.path.join(root, photo.cls, photo.file), 'wb') as f:
      f.write(raw(photo))
  return str(root)


def write_webdataset(path, photos: Sequence[Photo] = PHOTOS) -> str:
  """One tar: KEY.jpg/png, KEY.txt (first caption), KEY.cls (label) and KEY.json ({"captions": [...]})."""
  with tarfile.open(path, 'w') as tar:
    for photo in photos:
      meta = json.dumps({'captions': list(photo.captions), 'file': photo.file}).encode()
      for name, data in ((f'{key(photo)}.{ext(photo)}', raw(photo)), (f'{key(photo)}.txt', photo.captions[0].encode()),
                         (f'{key(photo)}.cls', str(label(photo)).encode()), (f'{key(photo)}.json', meta)):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return str(path)


def write_array_record(path, photos: Sequence[Photo] = PHOTOS) -> str:
  """One ArrayRecord file of msgpack maps {image, caption, label, captions}."""
  from jmm.data import array_record  # pylint: disable=g-import-not-at-top
  records = [array_record.msgpack.packb({'image': raw(p), 'caption': p.captions[0], 'label': label(p),
                                         'captions': list(p.captions)}, use_bin_type=True) for p in photos]
  array_record.write_records(str(path), records)
  return str(path)


def write_csv(path, image_paths: Sequence[str], photos: Sequence[Photo] = PHOTOS) -> str:
  """A header (image, caption, label), then one row per caption; image_paths[i] is photo i's image."""
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['image', 'caption', 'label'])
    for image, photo in zip(image_paths, photos):
      for caption in photo.captions:
        writer.writerow([image, caption, label(photo)])
  return str(path)


def write_jsonl(path, image_paths: Sequence[str], photos: Sequence[Photo] = PHOTOS) -> str:
  """One line per photo: {"image": ..., "captions": [...], "label": ...}."""
  with open(path, 'w') as f:
    for image, photo in zip(image_paths, photos):
      f.write(json.dumps({'image': image, 'captions': list(photo.captions), 'label': label(photo)}) + '\n')
  return str(path)


_BUILDER = None


def write_tfds(data_dir_: str, photos: Sequence[Photo] = PHOTOS) -> str:
  """Prepares TFDS_NAME ('test' split) in data_dir_ in TFDS's own format, with no download and no TensorFlow:
  features image (tfds.features.Image, given the encoded bytes, which TFDS stores as they are), label
  (ClassLabel over CLASSES) and captions (a Sequence of {'text'}: COCO's layout, read as 'captions/text')."""
  global _BUILDER  # One class per process: TFDS registers builder classes by name.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if _BUILDER is None:
    class JmmTestPhotos(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version('1.0.0')
      PHOTOS = ()

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(),
            'label': tfds.features.ClassLabel(names=CLASSES),
            'caption': tfds.features.Text(),
            'captions': tfds.features.Sequence({'text': tfds.features.Text()})}))

      def _split_generators(self, dl_manager):
        return {'test': self._generate_examples()}

      def _generate_examples(self):
        for photo in self.PHOTOS:
          yield photo.file, {'image': raw(photo), 'label': label(photo), 'caption': photo.captions[0],
                             'captions': {'text': list(photo.captions)}}
    _BUILDER = JmmTestPhotos
  _BUILDER.PHOTOS = tuple(photos)
  _BUILDER(data_dir=str(data_dir_), file_format='array_record').download_and_prepare()
  return TFDS_NAME


def reference_images(res: int, photos: Sequence[Photo] = PHOTOS) -> np.ndarray:
  """uint8 [len(photos), res, res, 3]: each photo's original bytes through the eval image transform."""
  from jmm.data import transforms  # pylint: disable=g-import-not-at-top
  transform = transforms.ImageTransform(res, draft=False)  # Eval decodes JPEGs in full (file_data.py).
  return np.stack([transform(raw(p)) for p in photos])
