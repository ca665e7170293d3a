"""The run directory: its files and their format (strict JSON, JSONL), where finitetune may
write (the owner marker, the lock), checkpoints on disk and their health, and resuming.
"""
