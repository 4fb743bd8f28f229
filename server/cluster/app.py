"""The Ray Serve application: `server.cluster.app:build` (Serve's application builder), used by the Serve config
(serve_config.yaml) and by `serve.run(build({...}))`.

    Ingress (1 by default) ─► EngineReplica × replicas, each with `replica_cpus` CPUs and up to
                              `tasks_per_replica` resident tasks
A Serve config's `deployments:` section overrides these deployment options (num_replicas, autoscaling_config,
ray_actor_options, max_ongoing_requests), as it does for any Serve application.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray.serve import Application

from ..settings import Settings
from .ingress import Ingress
from .replica import EngineReplica


class ClusterArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    replicas: int = Field(2, ge=1, description="engine replicas (the config's num_replicas or autoscaling_config "
                          "overrides it)")
    tasks_per_replica: int = Field(64, ge=1, description="tasks resident on one replica (Ray Serve's "
                                   "max_num_models_per_replica); the least recently used one leaves beyond it")
    replica_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per replica (fractions allowed)")
    ingress_cpus: float = Field(0.25, gt=0)
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica takes at once (decoding or "
                                      "queued); beyond it the router sends a task's request to another replica, "
                                      "which loads the task: the knob between affinity and balance. Above "
                                      "max_batch_size, so that batches fill")
    settings: dict[str, Any] = Field(default_factory=dict, description="Settings fields for every replica "
                                     "(MHR_* variables where Ray starts its workers fill the rest)")

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(value) - set(Settings.model_fields))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; see server/settings.py")
        Settings(**value)  # bounds and cross-field checks, here rather than in every replica
        return value


def build(args: ClusterArgs | dict) -> Application:
    args = args if isinstance(args, ClusterArgs) else ClusterArgs.model_validate(args)
    replicas = EngineReplica.options(num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                                     ray_actor_options={"num_cpus": args.replica_cpus})
    ingress = Ingress.options(ray_actor_options={"num_cpus": args.ingress_cpus})
    max_body_bytes = Settings(**args.settings).max_body_bytes
    return ingress.bind(replicas.bind(args.settings, args.tasks_per_replica), max_body_bytes)
