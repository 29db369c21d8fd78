"""A host's data: the canonical dataset file and its conversions (datasets.py), its manifest
(manifest.py), the cache (cache.py), a host's own model file checked without TensorFlow
(modelfile.py), and the files a client hands the daemon (handoff.py)."""
