"""The application layer: the one place in ``tpm`` that imports the plug-in packages.

``tpm`` below this package (policy interface, backbones, sampler, GRPO trainer, comparison runner,
loading, testbed) works on objects and never imports ``policies`` or ``rewards``; those packages
build on it. The modules here turn names from the command line and config files into those objects:

- :mod:`tpm.app.cli`: the ``tpm`` command (``sample``, ``compare``, ``export-scheduler``, ``train``,
  ``reward-serve``) and :func:`tpm.compare`;
- :mod:`tpm.app.recipe`: a training run's typed config (:class:`~tpm.app.recipe.RecipeConfig`),
  presets and flags;
- :mod:`tpm.app.train`: the training run, build -> train -> report;
- :mod:`tpm.app.plan`: what a run would do (``tpm train --dry-run``).
"""
