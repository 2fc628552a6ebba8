"""The only layer that runs user code.

A model/guide pair is traced (:mod:`~numpyro_iwae.core.program`), its plates read
(:mod:`~numpyro_iwae.core.plates`), its weighting planned (:mod:`~numpyro_iwae.core.plan`),
and its particles drawn (:mod:`~numpyro_iwae.core.stages`, :mod:`~numpyro_iwae.core.draw`)
into plain arrays of log weights that the objectives and evaluators reduce. The gradient
wiring that must see the model's log density as a function lives here too
(:mod:`~numpyro_iwae.core.paths`, :mod:`~numpyro_iwae.core.guard`), as does the annealed
density of :mod:`~numpyro_iwae.core.annealing`.
"""
