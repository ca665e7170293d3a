"""Test set-up shared by every test module.

The hub client retries for ~45 s when offline unless HF_HUB_OFFLINE is set *before*
transformers is imported, so it is set here, at collection time.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
