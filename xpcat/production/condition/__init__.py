"""The condition stage: raw tables -> conditioned flux partitions (SPEC §1).

Partition I/O on top (:mod:`.stage`), the join of one source_id range's rows
(:mod:`.tables`, :mod:`.metadata`), numerics below: Eqs. 2-4
(:mod:`.covariance`, and their fast path :mod:`.block_factor`), XP sampling
(:mod:`.xp_sampling` with :mod:`.bases` and :mod:`.xp_columns`), NIR
photometry (:mod:`.photometry`), threads and compiled kernels (:mod:`.parallel`).
"""
