"""mhr-serve on Ray Serve: several engine replicas behind one ingress, with task affinity and one shared store.

    client ─► Ray Serve proxy ─► Ingress (relay.py: reads the body, routing.py: which task)
                                   └─ DeploymentHandle.options(multiplexed_model_id=task) ─► EngineReplica
                                        the whole single-process app (create_app: routes, engine, jobs) per replica

Each replica runs the unchanged FastAPI app on its own engine (continuous batching as in one process); the ingress
only relays bytes, so routes, schemas, errors and streaming are the single-process server's by construction. Ray
Serve's model multiplexing (model id = task name) sends a task's requests to a replica where its adapter is resident.
Every replica reads one inventory and one adapted/ folder on a shared path (Settings.shared_store): the store looks
again at a lookup after store_refresh_s, and job records carry owner and heartbeat.

Ray is an optional extra (`pip install -e ".[cluster]"`); nothing outside this package imports it.
    app.py        the application builder (`server.cluster.app:build`) and its arguments
    ingress.py    the ingress deployment: relay, retries of idempotent requests when a replica dies
    replica.py    the engine replica deployment: the app, the multiplexed loader, residency
    relay.py      one HTTP request through an ASGI app in another process (Ray-free)
    routing.py    a request's task (the model id) and whether it may be sent again (Ray-free)
    serve_config.yaml   the Serve config `make serve-cluster` deploys
"""
