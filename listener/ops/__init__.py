"""
Incident operations on stored events: replay (:mod:`listener.ops.replay`) and
quarantine redrive (:mod:`listener.ops.redrive`). The commands and the admin API call
them; they publish through the one confirm window and read through journal queries.
"""
