"""The child side of ``finitetune run -- COMMAND``: the bootstrap that guards every Trainer a
program builds, the injected faults, the recorder, and the manifest of what ran.
"""
