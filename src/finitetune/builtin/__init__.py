"""The embedded defaults: the demo and tiny models and their tasks, with nothing downloaded at
run time (the demo's files come from PyPI packages, the tiny model is built from a config).
"""
