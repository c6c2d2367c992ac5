"""Comparing losses end to end: the same data, seed and budget trained with CE, focal and MiLe,
then evaluated downstream and per token-frequency bucket (``megatron-mile-compare``, ``make demo``).

``pipeline`` runs it (``steps`` makes every step run once), ``runs`` trains, ``heldout_task``
writes the lm-eval task, ``unigram`` gives the baseline the models must beat, ``aggregate`` and
``report`` make the table, ``figures`` the picture.
"""
