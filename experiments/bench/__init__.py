"""The benchmark suite: ``python -m experiments.bench [--quick] [--json PATH] [--only SECTIONS]``.

Sections (one module each): ``lattice`` and ``conv`` and ``population`` (:mod:`.host`), ``env``
(:mod:`.env`), ``ppo`` (:mod:`.ppo`), ``reference`` (:mod:`.torch_reference`, PyTorch eager),
``flops`` (:mod:`.flops`), ``breakdown`` (:mod:`.breakdown`, with :mod:`.profile`'s thunk time by
category), ``transformer`` (:mod:`.transformer`). :mod:`.cli` runs them and prints the headline
figures against their targets; :mod:`.timing` holds the shared timer. Every figure that matters is a ratio of
timings taken in this one process, in interleaved rounds (machines are noisy).
"""
