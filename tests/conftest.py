import os

# Tests never download: models come from configs, tokenizers are trained locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RLHF_NO_PROGRESS", "1")
