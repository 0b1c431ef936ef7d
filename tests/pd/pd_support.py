"""Configs and metric reading shared by the prefill/decode gateway tests."""

import re
import urllib.request

# Split only prompts of at least 200 uncached tokens; both profiles score by prefix cache.
THRESHOLD_CONFIG = {
    "apiVersion": "llm-d.ai/v1alpha1",
    "kind": "EndpointPickerConfig",
    "plugins": [
        {"type": "pd-profile-handler", "parameters": {"threshold": 200}},
        {"type": "prefill-filter"},
        {"type": "decode-filter"},
        {"type": "prefix-cache-scorer"},
        {"type": "max-score-picker"},
    ],
    "schedulingProfiles": [
        {"name": "prefill", "plugins": [{"pluginRef": "prefill-filter"}, {"pluginRef": "prefix-cache-scorer", "weight": 2}]},
        {"name": "decode", "plugins": [{"pluginRef": "decode-filter"}, {"pluginRef": "prefix-cache-scorer", "weight": 2}]},
    ],
}


def metric_sum(url: str, name: str, labels: str = "") -> float:
    """Return the sum of samples of `name` whose line contains every comma-separated part of `labels`."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(part in line for part in labels.split(",") if part):
            match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
            if match:
                total += float(match.group(2))
    return total
