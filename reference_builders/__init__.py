"""``c3po build-reference``: harvest a model's pathways on reference questions it answers correctly.

One module per job: :mod:`presets` (benchmark -> reference sets), :mod:`tasks`
(lm-eval task docs -> requests grouped by doc), :mod:`scoring` (lm-eval's own
``acc`` / ``acc_norm`` verdict), :mod:`harvest` (score, capture routing, embed,
hand records to the store writer) and :mod:`cli` (the command line).
"""
