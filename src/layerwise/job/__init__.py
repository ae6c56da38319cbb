"""The training job and its tools, built on the library: ``layerwise train``, ``generate``
and ``diagnose``, the run directory, checkpoints, the step guard, the corpus, the launcher.

The library (everything outside ``job`` and ``cli``) never imports from here.
"""
