"""The OpenAPI document of the HTTP API (a test keeps it in step with the routes)."""

from __future__ import annotations

from provisioner.states import StoreState

ERROR = {"$ref": "#/components/schemas/Error"}
STORE_STATES = tuple(state.value for state in StoreState)


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    text = {400: "bad input", 401: "admin credentials required", 403: "cross-site request",
            404: "unknown id", 409: "conflict", 415: "body is not application/json",
            413: "body too large", 429: "too many requests",
            503: "unavailable (not configured, or the database is busy: retry after "
                 "Retry-After)"}
    return {str(c): _json(ERROR, text[c]) for c in codes}


def _admin_get(summary: str, *, with_id: bool = False, params: list | None = None) -> dict:
    operation = {"summary": summary, "security": [{"basic": []}, {"bearer": []}],
                 "responses": {"200": _json({"type": "object"}, "OK"),
                               **_errors(401, *((404,) if with_id else ()))}}
    if params:
        operation["parameters"] = params
    return {"get": operation}


def _action(name: str) -> dict:
    return {"post": {"summary": f"Queue a {name} of the store's container (runs {name}.yml).",
                     "security": [{"basic": []}, {"bearer": []}],
                     # JSON only and no foreign Origin: no cross-site form can send it.
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object"}}}},
                     "responses": {"202": _json({"type": "object", "properties": {
                         "job_id": {"type": "integer"}, "status_url": {"type": "string"}}},
                         "queued"), **_errors(401, 403, 404, 409, 415)}}}


def _admin_post(summary: str, answer: dict) -> dict:
    return {"post": {"summary": summary, "security": [{"basic": []}, {"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {
                         "schema": {"type": "object"}}}},
                     "responses": {"202": _json({"type": "object", "properties": answer},
                                                "queued"), **_errors(401, 403, 404, 409, 415)},
                     "parameters": [*ID]}}


JOB_QUEUED = {"job_id": {"type": "integer"}, "status_url": {"type": "string"}}


def _query(name: str, schema: dict, description: str) -> dict:
    return {"name": name, "in": "query", "required": False, "schema": schema,
            "description": description}


PAGING = [_query("page", {"type": "integer", "minimum": 1}, "page number"),
          _query("per_page", {"type": "integer", "minimum": 1, "maximum": 200}, "page size")]
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}]


def document() -> dict:
    instance_id = [*ID]
    return {
        "openapi": "3.0.3",
        "info": {"title": "eBuilder Provisioner", "version": "1"},
        "components": {
            "securitySchemes": {"basic": {"type": "http", "scheme": "basic"},
                                "bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
        },
        "paths": {
            "/api/check-subdomain/": {"post": {
                "summary": "Is this subdomain free for a new store?",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["subdomain"],
                    "properties": {"subdomain": {"type": "string"}}}}}},
                "responses": {"200": _json({"type": "object", "properties": {
                    "available": {"type": "boolean"}, "reason": {"type": "string"},
                    "url": {"type": "string"}}}, "available or taken"), **_errors(400, 429)}}},
            "/api/create-checkout/": {"post": {
                "summary": "Start a Stripe Checkout (subscription) for a new store.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["subdomain", "site_name", "email"],
                    "properties": {"subdomain": {"type": "string"},
                                   "site_name": {"type": "string"},
                                   "email": {"type": "string", "format": "email"},
                                   "plan": {"type": "string", "description":
                                            "a plan's key; the first plan when absent"}}}}}},
                "responses": {"200": _json({"type": "object", "properties": {
                    "session_id": {"type": "string"}, "checkout_url": {"type": "string"}}},
                    "redirect the customer to checkout_url"), **_errors(400, 409, 429, 503)}}},
            "/api/webhook/stripe/": {"post": {
                "summary": "Stripe webhook (verified with the Stripe-Signature header).",
                "responses": {"200": _json({"type": "object"}, "recorded (or a duplicate)"),
                              **_errors(400, 413, 503)}}},
            "/api/health/": {"get": {
                "summary": "The service is up and its database usable.",
                "responses": {"200": _json({"type": "object"}, "up"),
                              **_errors(503)}}},
            "/api/status/": {"get": {"summary": "Public status: queue depth, stores running.",
                                     "responses": {"200": _json({"type": "object"}, "OK")}}},
            "/api/openapi.json": {"get": {"summary": "This document.",
                                          "responses": {"200": _json({"type": "object"}, "OK")}}},
            "/api/instances/": _admin_get(
                "Stores, newest first, one page of them: items, total, page, per_page, "
                "pages, next (the next page's number, null on the last).", params=[
                    _query("status", {"type": "string", "enum": list(STORE_STATES)},
                           "only stores in this state"),
                    _query("q", {"type": "string", "maxLength": 200},
                           "search subdomain, email and site name (case-insensitive)"),
                    *PAGING]),
            "/api/instances/{id}/": _admin_get("One store with recent jobs and log.",
                                               with_id=True, params=instance_id),
            "/api/instances/{id}/start/": {**_action("start"), "parameters": instance_id},
            "/api/instances/{id}/stop/": {**_action("stop"), "parameters": instance_id},
            "/api/instances/{id}/restart/": {**_action("restart"), "parameters": instance_id},
            "/api/instances/{id}/retry/": _admin_post(
                "Retry a failed, out-of-step or needs-attention store: a fresh converge "
                "towards what billing says (409 with the reason when it cannot be retried).",
                {"job_id": {"type": "integer", "nullable": True},
                 "status_url": {"type": "string", "nullable": True},
                 "status": {"type": "string"}, "desired_state": {"type": "string"},
                 "queued": {"type": "array", "items": {"type": "object"}}}),
            "/api/instances/{id}/apply-plan/": _admin_post(
                "Apply a refused plan change anyway: the container's limits are lowered "
                "even below what the store uses (409 when no change waits).",
                {"job_id": {"type": "integer", "nullable": True},
                 "status_url": {"type": "string", "nullable": True},
                 "plan": {"type": "object"}}),
            "/api/instances/{id}/backups/": {
                **_admin_get("The store's backups, newest first: archive, checksum, size, "
                             "second copy, status.", with_id=True, params=instance_id),
                **_admin_post("Queue a backup of the store now (409 when it has no data).",
                              JOB_QUEUED)},
            "/api/instances/{id}/restore/": _admin_post(
                "Queue putting a backup back: body {\"backup\": id or archive path}, the newest "
                "good one when left out. The archive is verified before the store is touched; "
                "the store is stopped, restored, started and checked, or gets its own data "
                "back.", {**JOB_QUEUED, "backup": {"type": "object"}}),
            "/api/instances/{id}/clone/": _admin_post(
                "Queue a new store with a copy of this one's data: body {\"subdomain\": "
                "the clone's name, \"backup\": optional id (default: one taken now)}.",
                {**JOB_QUEUED, "clone_id": {"type": "integer"},
                 "subdomain": {"type": "string"}}),
            "/api/instances/{id}/move/": _admin_post(
                "Queue moving the store to another Docker host: body {\"docker_host\": its "
                "inventory name}. 409 when it cannot go there (its state; the host unknown, "
                "draining or full). The store is down only while its data is copied; a failed "
                "move leaves it serving on its old host.",
                {**JOB_QUEUED, "from": {"type": "string"}, "to": {"type": "string"}}),
            "/api/instances/{id}/domains/": {
                **_admin_get("The store's own domains: status, DNS record to create, "
                             "certificate expiry.", with_id=True, params=instance_id),
                **_admin_post("Add a domain: body {\"name\": \"shop.example.com\"} (409 with "
                              "the reason when refused).",
                              {**JOB_QUEUED, "domain": {"type": "object"}})},
            "/api/instances/{id}/domains/{id}/remove/": _admin_post(
                "Queue the removal of a domain: vhost, ALLOWED_HOSTS, certificate.",
                {**JOB_QUEUED, "domain": {"type": "object"}}),
            "/api/instances/{id}/domains/{id}/check/": _admin_post(
                "Check a waiting or failed domain's DNS again now.",
                {**JOB_QUEUED, "domain": {"type": "object"}}),
            "/api/instances/{id}/uptime/": _admin_get(
                "Uptime from the health history: 30- and 90-day figures (null without "
                "data), hours checked, and one entry per day for 90 days.", with_id=True,
                params=instance_id),
            "/api/instances/{id}/health/": _admin_get(
                "Live check: container state and HTTP /health/.", with_id=True,
                params=instance_id),
            "/api/instances/{id}/stats/": _admin_get("CPU and memory from Docker.",
                                                     with_id=True, params=instance_id),
            "/api/customers/": _admin_get("Customers with subscriptions and stores.",
                                          params=PAGING),
            "/api/stats/": _admin_get("Counts per state, signups, cancellations, failures."),
            "/api/jobs/{id}/": _admin_get("A job's state and log.", with_id=True,
                                          params=instance_id),
            "/api/runs/{id}/": _admin_get("An ansible run: per-task events and stdout.",
                                          with_id=True, params=instance_id),
            "/api/webhooks/": _admin_get("Webhook deliveries, newest first, with their events.",
                                         params=[
                _query("outcome", {"type": "string",
                                   "enum": ["accepted", "duplicate", "rejected", "busy"]},
                       "only deliveries with this outcome"),
                _query("q", {"type": "string"}, "search event id, type and reason"),
                *PAGING]),
            "/api/events/{id}/": _admin_get("A recorded Stripe event (no payload), its jobs "
                                            "and deliveries.", with_id=True, params=instance_id),
            "/api/events/{id}/replay/": _admin_post(
                "Apply a recorded Stripe event again (409 while it is still queued).",
                JOB_QUEUED),
            "/api/audit/": _admin_get("The audit log: who did which admin action, newest first.",
                                      params=[
                _query("q", {"type": "string"}, "search actor, action, target and detail"),
                _query("target", {"type": "string"}, "one target exactly: instance:<id> "
                       "or event:<id>"), *PAGING]),
        },
    }
