"""Adapters from the core (guard, loss, validation) to the programs people train with:
``hf`` (transformers' Trainer, TRL, PEFT), ``deepspeed`` (ZeRO-1/2/3) and ``launch`` (the child
side of ``finitetune run``, for programs we cannot edit).
"""
