"""Applications built on the RECAST library: the ``peft-recast`` command line, the demo tasks, the one training loop,
the sentence encoder and the benchmark.

They import the library (``peft_recast``) by its public modules; the library never imports them.
"""
