"""The growth environment: one morphogenetic training run per member, stepped an epoch at a time
(``environment``), with factored actions and their masks (``actions``), observations
(``observations``), rewards (``rewards``), the divergence governor (``governor``), the tasks
(``tasks``) and the rule-based controllers (``controllers``); ``gymnax_env`` wraps it as a gymnax
environment (the ``gymnax`` extra, imported only there)."""
