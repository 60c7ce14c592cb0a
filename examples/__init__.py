"""Examples of using esper-jax as a library (importable from the repository root, e.g.
``--host examples.my_host:make_host``); not part of the installed package."""
