"""
The admin port (CONTRACT §7): health, readiness and metrics (:mod:`listener.admin.app`),
Bearer keys with scopes and rate limits (:mod:`listener.admin.auth`), the ``/v1`` API
(:mod:`listener.admin.api`) and its OpenAPI document (:mod:`listener.admin.openapi`).
"""
