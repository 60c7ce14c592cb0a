"""Training runs: settings and presets (``settings``) resolved into a typed configuration
(``config``), built into env, data and learner (``build``), trained chunk by chunk (``loop``) in a
run directory (``rundir``) with Orbax checkpoints (``checkpoint``), hyperparameter populations
and their placement on devices (``population``), loaded back (``load``), evaluated on held-out
envs (``evaluation``) and plotted (``plots``)."""
