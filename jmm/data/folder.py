"""A folder of class sub-folders (ImageNet's layout: ROOT/CLASS/IMAGE.jpg) as a random-access, labelled source.

For evaluation (zero-shot classification, linear probes). The label of an image is the index of its sub-folder's
name among the sorted sub-folder names, the convention torchvision's ImageFolder follows and the one that makes
ImageNet's synset folders (n01440764, ...) come out as its usual class ids 0..999. Images are found by their
extension (IMAGE_EXTENSIONS, any case) anywhere below a class folder; hidden files and folders ('.name') and
other files are ignored. The tree is listed once, at construction; paths are local or any fsspec URL.

An image file that cannot be read or decoded is a bad record: its read raises `BadRecord` (decoding happens in
the caller's transform), so the caller skips and counts it, as for the shard sources.
"""
from __future__ import annotations

import logging
import posixpath

import fsspec

from jmm.data.transforms import BadRecord

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp', 'bmp', 'gif', 'tif', 'tiff', 'ppm', 'pgm')


def _is_hidden(name: str) -> bool:
  return posixpath.basename(name.rstrip('/')).startswith('.')


def class_names(path: str, field: str = 'data.path') -> list[str]:
  """The sorted names of the class sub-folders of `path` (one listing, no walk); errors name `field`.

  Raises FileNotFoundError when `path` is not a directory and ValueError when it has no sub-folder.
  """
  fs, root = fsspec.core.url_to_fs(str(path))
  if not fs.isdir(root):
    raise FileNotFoundError(f'{field}={str(path)!r} is not a directory (expected a folder of class sub-folders, '
                            'ROOT/CLASS/IMAGE.jpg)')
  names = sorted(posixpath.basename(e['name'].rstrip('/')) for e in fs.ls(root, detail=True)
                 if e['type'] == 'directory' and not _is_hidden(e['name']))
  if not names:
    raise ValueError(f'{field}={str(path)!r} has no class sub-folders: expected ROOT/CLASS/IMAGE.jpg, one '
                     'sub-folder per class (labels are the sorted sub-folder names\' indices)')
  return names


class ImageFolderSource:
  """Random access to the images of a class-per-sub-folder tree (see the module docstring).

  `source[i]` -> {'image': encoded bytes, 'label': int, 'path': str}, or raises BadRecord. `class_names[label]`
  is the sub-folder name of a label.
  """

  def __init__(self, path: str, *, name: str = 'folder', extensions=IMAGE_EXTENSIONS, field: str = 'data.path'):
    self.name, self.path = name, str(path)
    self.class_names = class_names(self.path, field)
    self._fs, root = fsspec.core.url_to_fs(self.path)
    extensions = {e.lower().lstrip('.') for e in extensions}
    self._files, self._labels, skipped = [], [], 0
    for label, cls in enumerate(self.class_names):
      folder = posixpath.join(root.rstrip('/'), cls)
      found = []
      for file in sorted(self._fs.find(folder)):
        relative = posixpath.relpath(file, folder)
        if any(part.startswith('.') for part in relative.split('/')):
          continue
        if posixpath.splitext(file)[1].lower().lstrip('.') in extensions:
          found.append(file)
        else:
          skipped += 1
      if not found:
        logging.warning('%s: class folder %r holds no image (%s); its label %d has no example', name, cls,
                        '/'.join(sorted(extensions)), label)
      self._files += found
      self._labels += [label] * len(found)
    if skipped:
      logging.info('%s: ignored %d files without an image extension under %s', name, skipped, self.path)
    if not self._files:
      raise ValueError(f'{field}={self.path!r}: no image file ({"/".join(sorted(extensions))}) in any of its '
                       f'{len(self.class_names)} class sub-folders')

  def __len__(self) -> int:
    return len(self._files)

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.path!r}, {len(self.class_names)} classes, {len(self)} images)'

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self._files):
      raise IndexError(f'index {index} out of range for {self!r}')
    path = self._files[index]
    try:
      image = self._fs.cat_file(path)
    except OSError as e:
      raise BadRecord(f'{path}: cannot read: {type(e).__name__}: {e}') from None
    return {'image': image, 'label': self._labels[index], 'path': path}
