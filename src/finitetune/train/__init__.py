"""The main job, ``finitetune train``: data -> model -> Trainer -> evaluation -> run directory.
"""
