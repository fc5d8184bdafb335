"""Evaluators: zero-shot classification, retrieval and linear probes of a model's embeddings, fed by config.

The contract. An evaluator is a module `jmm.evaluators.<type>` (or any importable module path given as `type`)
with

    evaluate(embed_images, embed_texts, tokenizer, config) -> dict[str, float]
    validate(config) -> None   (optional; raises jmm.errors.ConfigError naming the bad field)

`config` is that eval's section of `config.evals` (a ConfigDict or a plain dict; a field set to None counts as
unset). `embed_images(float32 [N, H, W, 3] in [-1, 1]) -> [N, D]` and `embed_texts(int32 [N, L]) -> [N, D]`
are host-side, L2-normalised, and take batches of exactly `batch_size` rows. Metric keys are unprefixed: the
runner prefixes them with the eval's name ('zeroshot/top1'). `validate` reads no example (a glob of file
patterns at most); its messages start with the field's path inside the eval section ('data.name=...',
'templates[1]=...'), after `prefix` if given (`validate(config, prefix='config.evals.zeroshot.')`).

Every eval reads its data from `data`, a dict shaped like `config.data` (`common.data_with_defaults`):
  name          'synthetic' | 'webdataset' | 'array_record' | 'tfds' | 'folder' | 'captions_file'
  split         'test'
  num_examples  2000 for the synthetic data; all examples of a file source
  resolution    32; images are resized to it ('transform': 'resize' or 'resize_crop')
  synthetic:    seed (0), max_objects (1)
  file sources: paths, image_key, caption_key, tfds_name, data_dir, index_cache, as in `config.data`;
                captions_key: where an example keeps a list of captions ('json/captions', 'captions/text')
  folder:       path: ROOT/CLASS/IMAGE; label = index of CLASS among the sorted sub-folder names
  captions_file: path: a .csv (one row per caption) or .jsonl ({"image": ..., "captions": [...]}); image_key,
                caption_key, image_root (default: the file's folder)
File sources hold image + caption; an integer label is read from `label_key` of the same example (a
WebDataset member such as KEY.cls, a key of the ArrayRecord msgpack map, a TFDS feature, a captions_file
column); see `file_data`.
Plus, per eval: batch_size (256), text_len (16) and dims (()): prefix widths at which the evaluator runs again on
embeddings cut to their first d coordinates and re-normalised, keys suffixed '@d' (`common.evaluate_at_dims`).
similarity ('global'): 'filip' on zeroshot / synthetic_zeroshot / retrieval makes the embedding functions return
the FILIP head's token embeddings ([N, T, D], text padding as zero rows; `run.token_embed_fns`), which these
evaluators score with FILIP's late interaction through `common.similarities` (docs/evaluation.md).

  zeroshot            generic: class_names (a list or a text file, one per line; label i is class_names[i]; may
                      be left unset only on data that names its classes itself: the synthetic data, a folder),
                      templates (a list or a text file, one per line, each with exactly one '{}'; default
                      ('{}', 'a photo of a {}.')), label_key ('label'), ks ((1, 5)) -> top1, top5. Shipped lists
                      by name (assets/): class_names='imagenet', templates='clip80' | 'clip_short'.
  synthetic_zeroshot  zero-shot on the synthetic data (data defaults to its 'test' split) with its 48 class
                      names and caption-language template ensemble (templates overridable) -> top1, top1_seen,
                      top1_unseen, colour_top1, shape_top1.
  retrieval           caption_key / captions_key (override data's), ks ((1, 5, 10)); one caption per image, or
                      every caption of each image when the data has caption lists -> i2t_r{k}, t2i_r{k}.
  linear_probe        train_data (a data dict; default: data with split='train' and num_examples=train_examples
                      (2000); required for webdataset / array_record, whose split picks no files), label_key
                      ('label'), num_classes (the data's own class count, else max label + 1), l2 (None: chosen
                      from l2_grid on holdout_fraction (0.2) of the training examples, drawn with seed
                      (train_data.seed)) -> top1.
  region              region recognition on the synthetic data's multi-object images (CLOC): each box's region
                      embedding (method: a CLOC head's name, or 'pooled' patch tokens) classified among the 96
                      phrases -> top1, object_top1, colour_top1, shape_top1, size_top1, regions. Its module sets
                      EMBEDS = 'regions': run_evaluators passes embed_regions(images, boxes) as embed_images.
  fewshot             big_vision's few-shot probe: train_data / label_key / num_classes as linear_probe, shots
                      ((1, 5, 10, 25) images per class, drawn with seed (0), num_seeds (1) draws averaged),
                      l2_reg (2**10, fixed) -> 1shot, 5shot, 10shot, 25shot.
"""
