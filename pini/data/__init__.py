"""The data layer: datasets read from disk into a `Split`, few-shot sampling, images for the
trainer and their frozen features. It imports nothing above it (model, methods, training, CLI).

Where each concern lives:

- ``names``: the protocol's dataset names (CoOp's folder names), the one alias table and
  ``canonical_name`` (the prompt templates of ``pini.prompts`` resolve names through it too).
- ``split``: ``Split``, one dataset's samples and classes, and ``DatasetNotFoundError``.
- ``load``: ``load_dataset``, which finds a dataset folder, detects its layout and calls the
  reader below; the layouts it reads are listed in its docstring.
- Readers, one per layout: ``coop_split_file`` (CoOp's ``split_zhou_*.json`` datasets),
  ``fgvc_aircraft``, ``imagenet`` (ImageNet and its test-only variants), ``image_folder``
  (ImageFolder trees), ``digits`` (scikit-learn's bundled digits).
- ``listing``: listing image and class folders and reading text files, shared by the readers.
- ``sample_ids``: ``sample_id`` and ``listing_fingerprint``, a sample's and a listing's identity.
- ``few_shot``: K-shot sampling and its cached split file.
- ``transforms``: CLIP's preprocessing (``Preprocessing``, the weights' own; ``clip_transforms``;
  OpenAI's ``CLIP_MEAN``, ``CLIP_STD``).
- ``image_list``: ``ImageList`` and ``collate_skipping``, images as tensors for a DataLoader.
- ``features``: ``encode_samples``, ``EncodedImages`` and the in-process ``FeatureCache``.
"""
