"""
Several replicas on one RabbitMQ cluster (CONTRACT §10): units, their leases, cursors
and presence in RabbitMQ (:mod:`listener.cluster.leases`), and the coordinator that
takes, runs and hands them over (:mod:`listener.cluster.coordinator`).
"""
