"""Endpoint picker: an llm-d-compatible plugin pipeline configured by EndpointPickerConfig.

Profile handler, filters, scorers and picker; one plugin per module.
"""

from llmisvc.scheduler.config import DEFAULT_CONFIG, ConfigError, EndpointPickerConfig, config_from_args, parse_config
from llmisvc.scheduler.datastore import Datastore, Endpoint, EndpointSpec
from llmisvc.scheduler.framework import AllFiltered, NoReadyEndpoints, SchedulingRequest, SchedulingResult
from llmisvc.scheduler.metrics import SchedulerMetrics
from llmisvc.scheduler.scheduler import RoundRobinScheduler, Scheduler

__all__ = [
    "DEFAULT_CONFIG",
    "AllFiltered",
    "ConfigError",
    "Datastore",
    "Endpoint",
    "EndpointPickerConfig",
    "EndpointSpec",
    "NoReadyEndpoints",
    "RoundRobinScheduler",
    "Scheduler",
    "SchedulerMetrics",
    "SchedulingRequest",
    "SchedulingResult",
    "config_from_args",
    "parse_config",
]
