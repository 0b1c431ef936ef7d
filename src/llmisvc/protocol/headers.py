"""HTTP header names shared by the gateway, the sidecar, the scheduler and the engines."""

REQUEST_ID = "x-request-id"

# Set by the gateway on a response to name the endpoint that served it (debugging aid).
ENDPOINT = "x-llmisvc-endpoint"

# Reason a request was dropped with 429.
DROP_REASON = "x-llmisvc-drop-reason"

# Per-request override of the service's criticality: Critical, Standard or Sheddable.
CRITICALITY = "x-llmisvc-criticality"

# Session affinity token read by session-affinity-scorer.
SESSION_TOKEN = "x-session-token"

# llm-d routing headers. Clients may never set these; the gateway strips them on entry.
PREFILLER_HOST_PORT = "x-prefiller-host-port"
DESTINATION_ENDPOINT = "x-gateway-destination-endpoint"
DESTINATION_ENDPOINT_SERVED = "x-gateway-destination-endpoint-served"

CLIENT_ROUTING_HEADERS = frozenset({PREFILLER_HOST_PORT, DESTINATION_ENDPOINT, DESTINATION_ENDPOINT_SERVED})

# Hop-by-hop headers (RFC 9110 section 7.6.1) that a proxy must not forward.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
