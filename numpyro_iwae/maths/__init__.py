"""Pure array maths on log importance weights: nothing here knows about NumPyro.

Bounds (:mod:`~numpyro_iwae.maths.bounds`), gradient surrogates
(:mod:`~numpyro_iwae.maths.surrogates`), the SUMO series (:mod:`~numpyro_iwae.maths.sumo`),
PSIS diagnostics (:mod:`~numpyro_iwae.maths.psis`), the streaming log-sum-exp
(:mod:`~numpyro_iwae.maths.streaming`), annealed importance sampling
(:mod:`~numpyro_iwae.maths.ais`) and plate layout (:mod:`~numpyro_iwae.maths.layout`).
"""
