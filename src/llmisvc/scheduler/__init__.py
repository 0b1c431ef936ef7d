"""Endpoint picker: an llm-d-compatible plugin pipeline configured by EndpointPickerConfig.

Profile handler, filters, scorers and picker; one plugin per module.
"""
